"""Bypass mode: one runner per module runs every adapter bound to it.

y' = y + Σ sᵢ · Δyᵢ(x), each Δyᵢ written in place into its output slice. The module's class, its
parameters and its state_dict keys are never changed. Strengths are tensors, so changing them (or
disabling an adapter) re-traces nothing under torch.compile.

Most layers get a forward hook after their own forward. Where the runner computes the base GEMM
itself it sets the module's ``forward`` (an instance attribute, deleted on removal) instead:
- a plain float ``nn.Linear``: in eager training the low-rank adapters' output first, then the
  base GEMM accumulating into it (``_LowRank.under_base``; adding after the base would be out of
  place there, a copy of y), ``LORAPLUG_ACCUMULATE=0`` keeps the hooked order (compiled graphs take
  it too: there the out-of-place add fuses into the next kernel, see ``kernels.accumulates``);
- an fp8 base (``Fp8Linear``; a plain bf16/fp16 Linear on the shapes ``kernels.float_shape_fuses``
  picks, by default on the GPUs where that was measured faster, ``kernels.on_float_shapes``; any
  float Linear with ``LORAPLUG_KERNELS=all``) on CUDA with Triton: one fused GEMM that adds every
  low-rank adapter inside the base product (runtime.kernels), in eager mode and inside compiled
  graphs (as a registered operator).
Calls these cannot serve (masks, adapters that read the base output, other dtypes, CPU for the
kernels, training for the kernels) take the hooked order.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..algorithms.op import LayerOp, float_dtype
from ..arch import Target
from ..fp8 import Fp8Linear, cuda_capability, fp8_matmul_on
from ..specs.base import BaseView, Patch, channel_view
from ..specs.lora import LoraPatch
from . import kernels
from .masks import Mask
from .quant import float_bias, float_weight, is_float_weight
from .train_gemm import LoraUnderBase


@dataclass(eq=False)
class Entry:
    """One adapter bound to one module slice; ``strength`` is a 0-d float32 tensor (0 = off) and
    ``level`` the same value on the host (None: not known there), set together by the handle;
    ``mask`` (shared by the adapter set's entries) weights the output tokens, ``stream`` says which
    tokens this module's output holds (see runtime.masks)."""

    patch: Patch
    target: Target
    strength: Tensor
    mask: Mask | None = None
    stream: str | None = None
    level: float | None = None

    def mask_for(self, y: Tensor, channel_dim: int) -> Tensor | None:
        return None if self.mask is None else self.mask.weights(y, channel_dim, self.stream)


@dataclass(eq=False)
class _LowRank:
    """The low-rank entries of one module, stacked for one (device, dtype).

    down_t (in, Σr) runs every adapter's down projection in one GEMM; rank_scale (Σr,) holds
    scale·strength per rank column and is rewritten in place when a strength changes (so a
    compiled graph sees the new value without re-tracing); ups_t[i] (rᵢ, sizeᵢ) adds entry i into
    its output slice. Entries are sorted by output offset, so adapters stacked on one slice are
    neighbours: inference adds each slice's run of them with one GEMM (``runs``, ``run_ups``), one
    read-modify-write of that slice however many adapters it carries.
    """

    entries: list[Entry]
    down_t: Tensor
    ups_t: list[Tensor]
    spans: list[tuple[int, int, int, int]]  # (rank start, rank, output offset, output size)
    static_scale: Tensor
    rank_scale: Tensor
    span_scales: tuple[float, ...]  # each entry's static scale, on the host
    trained: bool
    cast: bool  # the adapters' own tensors are of another dtype (float32 masters, say)
    width: int
    runs: list[tuple[int, int, int, int]]  # (rank start, ranks, output offset, output size) per slice
    covers_output: bool  # the runs tile the whole output side by side (one run, or q/k/v slices)
    packs: dict[int, _FusedOperands] = field(default_factory=dict)
    column_ranks: Tensor | None = None  # trained groups: the rank start of each output column's run
    run_alphas: list[float] | None = None  # eager inference: each run's scale·strength (``refresh``)
    _run_ups: list[Tensor] | None = None

    def run_ups(self) -> list[Tensor]:
        """Each run's up projections in one (Σr, size) matrix (built on first use): the entry's own
        for a run of one, a view where the members' rows already lie one after another (the fused
        kernel's packing), else one stacked copy — which then holds the members that were copies
        made for this group (cast to another dtype or device: their ``ups_t`` become views into
        it), so an untrained group keeps one copy of its ups, not two."""
        if self._run_ups is None:
            ups = []
            for start, ranks, _, _ in self.runs:
                members = _members(self.spans, start, ranks)
                run = _adjacent_rows([self.ups_t[i] for i in members])
                if run is None:
                    run = torch.cat([self.ups_t[i] for i in members])
                    if not self.trained:  # trained ups are parameters' views: autograd must reach them
                        self._rest_on(run, members)
                ups.append(run)
            self._run_ups = ups
        return self._run_ups

    def _rest_on(self, run: Tensor, members: list[int]) -> None:
        """Members' ups that were copies made for this group become views into their run's stack."""
        row = 0
        for i in members:
            rank = self.spans[i][1]
            if not _shares_storage(self.ups_t[i], self.entries[i].patch.all_tensors().values()):
                self.ups_t[i] = run[row : row + rank]
            row += rank

    @classmethod
    def build(cls, found: list[tuple[Entry, tuple[Tensor, Tensor, float]]], out_features: int) -> _LowRank:
        downs = [f[0] for _, f in found]
        ranks = [d.shape[0] for d in downs]
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        scales = torch.cat([torch.full((r,), f[2]) for r, (_, f) in zip(ranks, found, strict=True)])
        spans = [
            (start, rank, e.target.offset, out_features if e.target.size is None else e.target.size)
            for start, rank, (e, _) in zip(starts, ranks, found, strict=True)
        ]
        static = scales.to(device=downs[0].device, dtype=downs[0].dtype)
        down_t, ups_t = _operands(found)
        group = cls(
            entries=[e for e, _ in found],
            down_t=down_t,
            ups_t=ups_t,
            spans=spans,
            static_scale=static,
            rank_scale=torch.empty_like(static),
            span_scales=tuple(float(f[2]) for _, f in found),
            trained=any(
                d.requires_grad or f[1].requires_grad for d, (_, f) in zip(downs, found, strict=True)
            ),
            cast=any(t.dtype != down_t.dtype for e, _ in found for t in e.patch.all_tensors().values()),
            width=out_features,
            runs=(runs := _runs(spans)),
            covers_output=_covers(runs, out_features),
        )
        if group.trained:
            group.column_ranks = _column_ranks(group.runs, out_features, down_t.device)
        group.refresh()
        return group

    def retensor(self, found: list[tuple[Entry, tuple[Tensor, Tensor, float]]]) -> _LowRank:
        """This trained group on its adapters' current tensors (spans and scales shared), as a new
        object: tensors stored on the cached group from inside a compiled graph would leave the
        graph as outputs, each fed a gradient back (zeros, per adapter and step)."""
        down_t, ups_t = _operands(found)
        # the constructor, not dataclasses.replace: traced by Dynamo, replace's introspection of
        # the fields leaves Python guards that every compiled call evaluates (a tiny Flux single
        # block's guards: 20.3 → 16.6 µs per call on a CPU; frozen 6.7)
        kept = {name: getattr(self, name) for name in _LOWRANK_FIELDS}
        return _LowRank(**kept, down_t=down_t, ups_t=ups_t, _run_ups=None)

    def packed(self, block_n: int) -> _FusedOperands:
        """The operands of the fused kernel for output tiles of width ``block_n`` (built once)."""
        if block_n not in self.packs:
            packing = kernels.pack_ups(self.spans, self.ups_t, self.width, block_n)
            self.packs[block_n] = _FusedOperands.build(packing, self.down_t, self.rank_scale)
            views = None if self.trained else kernels.up_views(self.spans, packing)
            if views is not None:  # the portable path reads the packing too: one copy, not two
                self.ups_t, self._run_ups = views, None
        return self.packs[block_n]

    def refresh(self) -> None:
        """rank_scale = static scale × each entry's current strength; ``run_alphas`` the same on
        the host, one number per run where its entries share it (untrained groups)."""
        self.run_alphas = (
            None if self.trained else _run_alphas(self.runs, self.spans, self.span_scales, self.entries)
        )
        strengths = torch.cat(
            [
                e.strength.reshape(1).expand(r)
                for e, (_, r, _, _) in zip(self.entries, self.spans, strict=True)
            ]
        )
        with torch.no_grad():
            self.rank_scale.copy_(self.static_scale * strengths.to(self.static_scale))
            for fused in self.packs.values():
                fused.refresh(self.rank_scale)

    def _pads(self, width: int) -> bool:
        """Whether ``_block_up`` pads (builds a matrix): anything but one adapter on the whole output."""
        return not (len(self.ups_t) == 1 and self.spans[0][2:] == (0, width))

    def _block_up(self, width: int, scale: Tensor | None = None) -> Tensor:
        """Every up projection in one (Σr, width) matrix, zero outside each entry's slice, laid out
        column-major like the ups themselves (transposed (n, r) rows): the GEMMs' gradient for it
        comes back in that layout, and each up's slice of it reaches autograd's accumulation with
        its parameter's strides (stored as it is, not copied per parameter and step). ``scale``
        (Σr,) multiplies each rank's row on the way (in the padding's own kernel when compiled)."""
        ups = self.ups_t
        if scale is not None:
            ups = [up_t * scale[s : s + r, None] for (s, r, _, _), up_t in zip(self.spans, ups, strict=True)]
        if not self._pads(width):
            return ups[0]  # one adapter on the whole output: nothing to pad
        blocks = [F.pad(up_t.T, (0, 0, offset, width - offset - size)) for (_, _, offset, size), up_t in zip(self.spans, ups, strict=True)]  # fmt: skip
        return torch.cat(blocks, 1).T

    def hidden(self, x2: Tensor) -> Tensor:
        """x·Aᵀ of every entry, each rank scaled by scale·strength: in place after the product
        (inference), out of place (training), or folded into the (small) down projection when
        trained adapters are cast to x's dtype — under torch.compile the kernel that casts them
        scales them too (and their gradients on the way back): one kernel fewer per adapter each
        way (counted in a tiny Flux's compiled training step; without a cast it adds one)."""
        if self.trained and self.cast:
            return torch.mm(x2, self.down_t * self.rank_scale)
        hidden = torch.mm(x2, self.down_t)
        return hidden * self.rank_scale if self.trained else hidden.mul_(self.rank_scale)

    def under_base(self, x2: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x·Wᵀ + bias + every entry, for runs that cover the output: the adapters' output is
        written first and the base GEMM accumulates into it (cuBLAS reads it in its epilogue), so y
        is not copied and rewritten after the base (training adds out of place);
        several runs take one block-diagonal up projection."""
        up = self.run_ups()[0] if len(self.runs) == 1 else self._block_up(self.width)
        if self.trains_frozen(weight, bias):
            return LoraUnderBase.apply(x2, weight, bias, self.down_t * self.rank_scale, up)
        hidden = self.hidden(x2)
        y = torch.mm(hidden, up) if bias is None else torch.addmm(bias, hidden, up)
        # a mode keeping GEMM outputs (selective checkpointing) must find them as they were
        if is_in_torch_dispatch_mode():
            return torch.addmm(y, x2, weight.t())
        return y.addmm_(x2, weight.t())

    def trains_frozen(self, weight: Tensor, bias: Tensor | None) -> bool:
        """Trained adapters on a frozen base with gradients on: ``under_base`` runs as one
        differentiable call (``train_gemm``: dx accumulated by the base GEMM, not added after it)
        unless ``LORAPLUG_TRAIN_GEMM=0``."""
        return (
            self.trained
            and torch.is_grad_enabled()
            and kernels.trains_in_one_call()
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
        )

    def add_into(self, x: Tensor, y: Tensor, masks: list[Tensor | None] | None = None) -> Tensor:
        """y + Σ mᵢ·sᵢ·scaleᵢ·(x Aᵢᵀ) Bᵢᵀ, each into its slice; a token mask mᵢ scales the rows of
        the small hidden activation (exact, since Bᵢ acts per row).

        Eager inference adds in place, slice by slice (no copy of y, no extra memory), each run's
        scale·strength as the GEMM's alpha where the run's entries share one (``run_alphas``: no
        pass over the hidden activation to scale it, one kernel launch fewer per layer), except
        while a CUDA graph is captured (a replay must read the strengths' tensors). Training
        builds the ups into one block matrix and adds out of place: in-place writes into slices of
        an output autograd tracks would copy its whole gradient once per slice in the backward
        pass. Compiled graphs add the block product out of place too, an add Inductor fuses into
        the next kernel (an in-place or beta=1 GEMM there copies y into a new buffer first); with
        several slices there the scales ride on the block's padding kernel instead of a pass over
        the hidden activation (strengths stay tensors: a change does not re-trace).
        """
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        compiling = torch.compiler.is_compiling()  # graphs take strengths as tensors: no re-tracing
        alphas = None if compiling or _capturing(x) else self.run_alphas  # (None for trained groups)
        scaled_up = compiling and not self.trained and self._pads(y2.shape[1])
        hidden = torch.mm(x2, self.down_t) if alphas is not None or scaled_up else self.hidden(x2)
        if masks is not None:
            rows = [None if m is None else m.expand(*y.shape[:-1], 1).reshape(-1, 1) for m in masks]
            parts = [hidden.narrow(1, s, r) * m if m is not None else hidden.narrow(1, s, r)
                     for (s, r, _, _), m in zip(self.spans, rows, strict=True)]  # fmt: skip
            hidden = torch.cat(parts, 1)
        if compiling:  # reshaped first: Inductor makes add(y, mm) an addmm
            up = self._block_up(y2.shape[1], self.rank_scale if scaled_up else None)
            return y + torch.mm(hidden, up).to(y2.dtype).view(y.shape)
        if self.trained and torch.is_grad_enabled():
            return torch.addmm(y2, hidden, self._block_up(y2.shape[1])).view(y.shape)
        dtype = y2.dtype  # autocast casts the GEMMs above, never an in-place one
        hidden = hidden if hidden.dtype == dtype else hidden.to(dtype)  # (a no-op .to costs µs per call)
        ups = [up if up.dtype == dtype else up.to(dtype) for up in self.run_ups()]
        if len(ups) == 1 and self.covers_output:  # one run on the whole output (most layers)
            y2.addmm_(hidden, ups[0], alpha=1.0 if alphas is None else alphas[0])
            return y
        for i, (out, part, up) in enumerate(zip(self._run_outputs(y2), self._run_hiddens(hidden), ups, strict=True)):  # fmt: skip
            out.addmm_(part, up, alpha=1.0 if alphas is None else alphas[i])
        return y

    def _run_outputs(self, y2: Tensor) -> list[Tensor] | tuple[Tensor, ...]:
        """Each run's slice of y2 (the whole of it for a run on the whole output): one split where
        the runs tile the output and nothing tracks y2's gradient (in-place writes into a split's
        views are refused under autograd), else a view per run (each costs about as much host
        time as the whole split)."""
        if self.covers_output and not y2.requires_grad:
            return y2.split_with_sizes([size for _, _, _, size in self.runs], 1)
        return [y2 if size == y2.shape[1] else y2.narrow(1, offset, size) for _, _, offset, size in self.runs]

    def _run_hiddens(self, hidden: Tensor) -> tuple[Tensor, ...]:
        """Each run's columns of the hidden activation (the runs' ranks lie side by side, in order)."""
        return hidden.split_with_sizes([r for _, r, _, _ in self.runs], 1)


# what ``_LowRank.retensor`` carries over to the group on the parameters' current tensors
_LOWRANK_FIELDS = tuple(f.name for f in fields(_LowRank) if f.name not in ("down_t", "ups_t", "_run_ups"))


def _runs(spans: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Neighbouring spans on the same output slice merged into one run (their ranks side by side)."""
    runs: list[tuple[int, int, int, int]] = []
    for start, rank, offset, size in spans:
        if runs and runs[-1][2:] == (offset, size):
            runs[-1] = (runs[-1][0], runs[-1][1] + rank, offset, size)
        else:
            runs.append((start, rank, offset, size))
    return runs


def _members(spans: list[tuple[int, int, int, int]], start: int, ranks: int) -> list[int]:
    """The entries (indices into ``spans``) of the run whose ranks are ``start … start + ranks``."""
    return [i for i, (s, _, _, _) in enumerate(spans) if start <= s < start + ranks]


def _capturing(x: Tensor) -> bool:
    """A CUDA graph is being captured on x's device: numbers passed to kernels would be frozen in it."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _run_alphas(
    runs: list[tuple[int, int, int, int]],
    spans: list[tuple[int, int, int, int]],
    span_scales: tuple[float, ...],
    entries: list[Entry],
) -> list[float] | None:
    """Each run's scale·strength where all of the run's entries have that same one, known on the
    host; else None (the hidden activation is then scaled per rank)."""
    alphas = []
    for start, ranks, _, _ in runs:
        levels = [(span_scales[i], entries[i].level) for i in _members(spans, start, ranks)]
        values = {None if level is None else scale * level for scale, level in levels}
        if len(values) != 1 or None in values:
            return None
        alphas.append(values.pop())
    return alphas


def _column_ranks(runs: list[tuple[int, int, int, int]], width: int, device: torch.device) -> Tensor:
    """(width,) int32: for each output column the first stacked rank of the run covering it."""
    starts = torch.zeros(width, dtype=torch.int32)
    for start, _, offset, size in runs:
        starts[offset : offset + size] = start
    return starts.to(device)


def _covers(runs: list[tuple[int, int, int, int]], width: int) -> bool:
    """The runs' slices lie side by side from column 0 to ``width``."""
    end = 0
    for _, _, offset, size in runs:
        if offset != end:
            return False
        end = offset + size
    return end == width


@dataclass(eq=False)
class _FusedOperands:
    """A group's operands for ``kernels.lora_linear``: the down projections and rank scales in the
    packing's column order (the group's own tensors when that is the stacked order)."""

    down_t: Tensor
    rank_scale: Tensor
    hstart: Tensor
    packed: Tensor
    columns: Tensor | None

    @classmethod
    def build(cls, packing: kernels.Packing, down_t: Tensor, rank_scale: Tensor) -> _FusedOperands:
        if packing.columns is None:
            return cls(down_t, rank_scale, packing.hstart, packing.packed, None)
        columns = torch.tensor(packing.columns, device=down_t.device)
        scales = rank_scale.new_empty(len(packing.columns))
        fused = cls(
            _gather_columns(down_t.detach(), columns), scales, packing.hstart, packing.packed, columns
        )
        fused.refresh(rank_scale)
        return fused

    def refresh(self, rank_scale: Tensor) -> None:
        if self.columns is not None:
            self.rank_scale.copy_(_gather_columns(rank_scale[None], self.columns)[0])


def _adjacent_rows(members: list[Tensor]) -> Tensor | None:
    """The members ((rᵢ, size) matrices) as one (Σr, size) view where each one's rows follow the
    previous one's in the same storage (one member: itself), else None."""
    first = members[0]
    if len(members) == 1:
        return first
    end = first.data_ptr()
    for m in members:
        if m.data_ptr() != end or m.stride() != first.stride() or m.shape[1:] != first.shape[1:]:
            return None
        if m.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        end += m.shape[0] * m.stride(0) * m.element_size()
    return first.as_strided((sum(m.shape[0] for m in members), *first.shape[1:]), first.stride())


def _shares_storage(t: Tensor, others) -> bool:
    """Whether ``t`` lives in the storage of one of ``others`` (an adapter's own tensor)."""
    ptr = t.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


def _gather_columns(t: Tensor, columns: Tensor) -> Tensor:
    """t[:, columns], contiguous."""
    return t[:, columns].contiguous()


def _operands(found: list[tuple[Entry, tuple[Tensor, Tensor, float]]]) -> tuple[Tensor, list[Tensor]]:
    """(down_t, ups_t) as transposed views of the adapters' tensors (the GEMMs take them as they
    are: no copy, and autograd reaches trained parameters); several entries' downs stacked once."""
    downs = [f[0] for _, f in found]
    return (downs[0] if len(downs) == 1 else torch.cat(downs)).T, [f[1].T for _, f in found]


class ModuleBypass:
    """Everything loraplug runs beside one module: behind a single forward hook, or (where the fused
    Triton kernel stands in for the base GEMM) as the module's forward."""

    def __init__(self, module: nn.Module, name: str, op: LayerOp):
        self.module_ref = weakref.ref(module)
        self.name = name
        self.op = op
        self.entries: list[Entry] = []
        self.grouping = op.kind == "linear"
        self._lowrank: dict[tuple, _LowRank] = {}
        self._weight_key: tuple | None = None
        self._weight: Tensor | None = None
        # Where the runner computes the base GEMM itself (the fused kernels; a plain Linear's GEMM
        # accumulating into the adapters' output), it takes the module's forward (an instance
        # attribute, removed again by close()); elsewhere it is a forward hook after the module's
        # own forward.
        # float bases fused on the measured shapes only (decided here, once: a plain attribute
        # inside compiled graphs, not a device query per call)
        self.float_shapes = _float_shapes(module)
        self.fused = self.grouping and _fusable(module, self.float_shapes)
        self.accumulating = self.grouping and _accumulable(module)
        self.trains = self.grouping and _trains(module)
        if self.fused or self.accumulating or self.trains:
            module.forward = self.forward  # a bound method: no reference cycle through the module
            self._hook = None
        else:
            self._hook = module.register_forward_hook(self._run, with_kwargs=True)

    def __deepcopy__(self, memo: dict) -> ModuleBypass:
        """A copied model (an EMA copy, say) gets its own runner — copied entries (adapters,
        strengths), empty caches (they hold views of trained parameters, which do not copy) — bound
        to the module's copy (copied first: the runner is reached through its forward or hooks)
        and registered for it, so the copy computes with its own weights."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self._own_state().items():
            setattr(copied, key, copy.deepcopy(value, memo))
        copied.__dict__.update(_empty_caches())
        module = self.module_ref()
        twin = memo.get(id(module), module)
        copied.module_ref = weakref.ref(twin)
        if twin is not module:
            _ACTIVE[twin] = copied
        return copied

    def _own_state(self) -> dict:
        """What a copy or a pickle carries: everything but the caches and the weak module reference."""
        return {k: v for k, v in self.__dict__.items() if k not in _CACHES and k != "module_ref"}

    def __getstate__(self) -> dict:
        """Pickling a model with its adapters (``torch.save(model)``): the module itself in place of
        the weak reference (pickle keeps it one object), caches left out (rebuilt on first use)."""
        return {**self._own_state(), "module": self.module_ref()}

    def __setstate__(self, state: dict) -> None:
        module = state.pop("module")
        self.__dict__.update(state)
        self.__dict__.update(_empty_caches())
        self.module_ref = weakref.ref(module)
        _ACTIVE[module] = self

    def _float_weight(self) -> Tensor:
        """The whole weight in float32, computed once per weight version (DoRA/OFT need it)."""
        w = self.module_ref().weight
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if key != self._weight_key:
            self._weight, self._weight_key = float_weight(self.module_ref(), self.name), key
        return self._weight

    def _view(self, entry: Entry, out: Tensor | None = None) -> BaseView:
        t = entry.target
        module = self.module_ref()

        def narrow(v: Tensor | None, dim: int) -> Tensor | None:
            return v if v is None or t.size is None else v.narrow(dim, t.offset, t.size)

        def run(u: Tensor) -> Tensor:
            if is_float_weight(module):
                return self.op.run(u, narrow(module.weight, 0).to(u.dtype))
            y = type(module).forward(module, u)  # the class's forward: no adapters, any weight type
            bias = float_bias(module)
            if bias is not None:
                y = y - channel_view(bias.to(y.dtype), y, self.op.channel_dim)
            return narrow(y, self.op.channel_dim)

        return BaseView(
            weight=lambda: narrow(self._float_weight(), 0),
            bias=lambda: narrow(float_bias(module), 0),
            run=run,
            output=out,
        )

    def _masked(self) -> bool:
        """Some entry has a region mask set (the fused and accumulating paths then step aside)."""
        return any(e.mask is not None and e.mask.value is not None for e in self.entries)

    def _slice(self, entry: Entry, y: Tensor) -> Tensor:
        t = entry.target
        return y if t.size is None else y.narrow(self.op.channel_dim, t.offset, t.size)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The module's forward while the runner owns it: the fused kernel or the accumulating base
        GEMM where they apply, otherwise the module's own forward followed by the portable path."""
        module = self.module_ref()
        y = None
        if not (args or kwargs):
            y = self._fused_output(module, x) if self.fused else None
            if y is None and self.trains:
                y = self._trained_output(module, x)
            if y is None and self.accumulating:
                y = self._accumulated_output(module, x)
        if y is None:
            y = self._run(module, (x, *args), kwargs, type(module).forward(module, x, *args, **kwargs))
        return y

    def _accumulated_output(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """y = adapters, then the base GEMM accumulating into it (_LowRank.under_base), in eager
        training (and in compiled graphs for trained adapters on a frozen base, as an operator, or
        always with ``LORAPLUG_ACCUMULATE=all``), where adding after the base would copy y (out of
        place); None where
        that is not exactly the hook path's result (weights of another dtype or kind, masks,
        adapters that read the base output, runs that leave part of the output bare) and in eager
        inference (in place after the base, measured equal: benchmarks/README.md)."""
        compiling = torch.compiler.is_compiling()
        if not (torch.is_grad_enabled() or compiling) or not kernels.accumulates():
            return None  # inference without autograd: the in-place order (first, it is the common call)
        w = module.weight
        device = x.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
            return None  # autocast would change the dtype of some GEMMs but not the in-place one
        if not (
            type(w) in (nn.Parameter, Tensor)  # quantized weights are tensor subclasses
            and w.dtype == x.dtype
            and x.is_floating_point()
            and w.device == x.device
        ):
            return None
        if self._masked():
            return None
        lowrank = self._lowrank_for(x)
        if lowrank is None or len(lowrank.entries) != len(self.entries) or not lowrank.covers_output:
            return None
        bias = module.bias
        if compiling and not (kernels.accumulates(compiling) or lowrank.trains_frozen(w, bias)):
            return None
        tracked = torch.is_grad_enabled() and (lowrank.trained or x.requires_grad)
        if not (tracked or compiling):
            return None  # eager inference adds in place after the base: no copy either way (measured equal)
        y = lowrank.under_base(x.reshape(-1, x.shape[-1]), w, None if bias is None else bias.to(x.dtype))
        return y.view(*x.shape[:-1], y.shape[-1])

    def _trained_output(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """y = base + every trained LoRA through the training kernels (``kernels.lora_train_linear``),
        where they compute exactly what the portable path would: gradients on, a frozen bf16/fp16
        weight of x's dtype and device, no autocast to another dtype, no masks, and LoRAs of one
        rank covering the output one per slice (``_trained_operands``); else None."""
        if not (torch.is_grad_enabled() and (x.is_cuda or kernels.interpreting())):
            return None
        w, bias = module.weight, module.bias
        if not (
            type(w) in (nn.Parameter, Tensor)
            and not w.requires_grad
            and (bias is None or not bias.requires_grad)
            and w.dtype == x.dtype
            and x.dtype in (torch.bfloat16, torch.float16)
            and w.device == x.device
        ):
            return None
        device = x.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
            return None
        if self._masked():
            return None
        operands = self._trained_operands(x)
        if operands is None:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        y = kernels.lora_train_linear(x2, w, None if bias is None else bias.to(x.dtype), *operands)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _trained_operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """(down (R, K), up (N, r), column ranks, rank scales) for the training kernels: the
        adapters' own parameters (stacked when a module carries one per slice), or None where
        the module's adapters are not trained LoRAs of one rank and dtype, one per slice."""
        group = self._lowrank.get((x.device, x.dtype)) or self._lowrank_for(x)
        if (
            group is None
            or not group.trained
            or len(group.entries) != len(self.entries)
            or len(group.runs) != len(group.entries)
            or not group.covers_output
            or not kernels.supports_training(x.shape[-1], group.width, [o for _, _, o, _ in group.runs])
        ):
            return None
        tensors = [e.patch.all_tensors() for e in group.entries]
        if not all(type(e.patch) is LoraPatch and set(t) == {"down", "up"} for e, t in zip(group.entries, tensors, strict=True)):  # fmt: skip
            return None
        downs, ups = [t["down"] for t in tensors], [t["up"] for t in tensors]
        first = downs[0]
        if not all(
            t.shape[i] == first.shape[0] and t.dtype == first.dtype and t.device == x.device and t.is_contiguous()
            for pair in zip(downs, ups, strict=True)
            for i, t in enumerate(pair)
        ):  # fmt: skip
            return None
        down = first if len(downs) == 1 else torch.cat(downs)
        up = ups[0] if len(ups) == 1 else torch.cat(ups)
        return down, up, group.column_ranks, group.rank_scale

    def _fused_group(self, module: nn.Module, x: Tensor) -> _LowRank | None:
        """The low-rank group when the fused kernel computes this call exactly as the portable path
        would, else None."""
        w = module.weight
        if not (
            x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and kernels.supports(x.shape[-1], w.shape[0])
        ):
            return None
        if self._masked():
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or any(g.trained for g in self._lowrank.values())
        ):
            return None  # the kernels have no backward: training takes the portable path
        if (
            not isinstance(module, Fp8Linear)
            and self.float_shapes
            and not (
                kernels.has_tma(cuda_capability(x.device))  # measured on Hopper's TMA kernel only
                and kernels.float_shape_fuses(
                    x.numel() // x.shape[-1], x.shape[-1], w.shape[0],
                    kernels.sm_count(x.device),
                )
            )
        ):  # fmt: skip
            return None
        if not (w.dtype == x.dtype or (isinstance(module, Fp8Linear) and fp8_matmul_on(x.device))):
            return None
        lowrank = self._lowrank_for(x)
        if lowrank is None or len(lowrank.entries) != len(self.entries) or lowrank.trained:
            return None
        # The packing is host work: built at apply (on CUDA) or lazily in eager, never while
        # compiling, and only for weights the kernel can move (checked here in eager; inside a graph
        # the address is unknown, and reading it broke the graph at every fused layer)
        if torch.compiler.is_compiling():
            if not kernels.fuses_in_graphs(cuda_capability(x.device)):
                return None
            return lowrank if _block_n(module) in lowrank.packs else None
        return lowrank if tma_aligned(w) else None

    def _fused_output(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """y = base(x) + every low-rank adapter, in one Triton GEMM (None: not applicable here)."""
        lowrank = self._fused_group(module, x)
        return None if lowrank is None else self._fused(module, x, lowrank)

    def _fused(self, module: nn.Module, x: Tensor, lowrank: _LowRank) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        bias = None if module.bias is None else module.bias.to(x.dtype)
        w = module.weight
        fused = lowrank.packed(_block_n(module))
        # the call computes h = x·down_t (a cuBLAS GEMM; on a side stream while a CUDA graph is
        # captured) and, for an fp8 weight, quantizes x: one operator when compiled
        w_scale = module.weight_scale if isinstance(module, Fp8Linear) else None
        y = kernels.lora_linear(x2, w, bias, None, fused.down_t, fused.hstart, fused.rank_scale, fused.packed, None, w_scale, x.dtype)  # fmt: skip
        return y.view(*x.shape[:-1], y.shape[-1])

    def _run(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        if not self.entries:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        y = output
        lowrank = self._lowrank_for(x) if self.grouping and y.is_contiguous() else None
        masked = self._masked()
        masks = [e.mask_for(y, self.op.channel_dim) for e in lowrank.entries] if masked and lowrank else None
        if lowrank is not None and len(lowrank.entries) == len(self.entries):  # the common, fast case
            return lowrank.add_into(x, y, masks)
        # Adapters that read the base output (DoRA, OFT) see it before anything is added.
        reading = [
            (e, e.patch.output_delta(x, self._view(e, self._slice(e, y)), e.strength))
            for e in self.entries
            if e.patch.reads_base
        ]
        if torch.is_grad_enabled() and (
            y.requires_grad
            or any(t.requires_grad for e in self.entries for t in e.patch.all_tensors().values())
        ):
            y = y.clone()  # the adds below are in place: never on a tensor autograd saved
        done = set()
        if lowrank is not None:
            y = lowrank.add_into(x, y, masks)
            done = {id(e) for e in lowrank.entries}
        for e in self.entries:
            if not e.patch.reads_base and id(e) not in done:
                self._add(e, y, e.patch.output_delta(x, self._view(e), e.strength))
        for e, delta in reading:
            self._add(e, y, delta)
        return y

    def _add(self, entry: Entry, y: Tensor, delta: Tensor) -> None:
        weights = entry.mask_for(y, self.op.channel_dim)
        self._slice(entry, y).add_((delta if weights is None else delta * weights).to(y.dtype))

    def _lowrank_for(self, x: Tensor) -> _LowRank | None:
        """The stacked low-rank entries for x's device/dtype (cached unless being trained)."""
        slot = (x.device, x.dtype)
        group = self._lowrank.get(slot)
        if group is not None and group.trained:  # same structure, the parameters' current tensors
            return group.retensor([(e, e.patch.low_rank(x)) for e in group.entries])
        if group is None:
            found = [(e, e.patch.low_rank(x)) for e in self.entries if not e.patch.reads_base]
            # by output slice: adapters stacked on one slice become neighbours (one run each in
            # add_into, one run of columns per output tile in kernels.pack_ups)
            found = sorted(((e, f) for e, f in found if f is not None), key=lambda ef: self._slice_key(ef[0]))
            if not found:
                return None
            group = self._lowrank[slot] = _LowRank.build(found, self.op.out_features)
        return group

    def _slice_key(self, entry: Entry) -> tuple[int, int]:
        size = entry.target.size
        return entry.target.offset, self.op.out_features if size is None else size

    def refresh_strengths(self) -> None:
        for group in self._lowrank.values():
            group.refresh()

    def warm(self) -> None:
        """Build the caches for activations in the weight's dtype now, so that a compiled model
        does not see them appear (and re-trace) on its second call."""
        self._lowrank.clear()
        w = getattr(self.module_ref(), "weight", None)
        if (
            self.grouping
            and w is not None
            and w.device.type != "meta"
            and (float_dtype(w.dtype) or isinstance(self.module_ref(), Fp8Linear))
        ):
            dtype = w.dtype if float_dtype(w.dtype) else torch.bfloat16  # fp8: bf16 activations
            group = self._lowrank_for(torch.empty(0, device=w.device, dtype=dtype))
            if group is None or group.trained:
                return  # trained adapters never take the kernels, and are read afresh each call
            if self.fused and w.is_cuda and tma_aligned(w):
                kernels.ops()  # imported now, not inside a compiled region
                group.packed(_block_n(self.module_ref()))
            else:
                group.run_ups()  # built now: a compiled graph would guard on the cache being empty

    def close(self) -> None:
        module = self.module_ref()
        if self._hook is not None:
            self._hook.remove()
        elif module is not None and module.__dict__.get("forward") == self.forward:
            del module.forward


def _empty_caches() -> dict:
    """A runner's caches, empty: never copied or pickled, rebuilt on first use."""
    return {"_lowrank": {}, "_weight_key": None, "_weight": None}


_CACHES = tuple(_empty_caches())


def tma_aligned(w: Tensor) -> bool:
    """Whether the tensor memory accelerator can move ``w`` by rows: contiguous from a 16-byte
    aligned address (host-side: compiled graphs cannot read the address)."""
    return w.is_contiguous() and w.data_ptr() % 16 == 0


def _block_n(module: nn.Module) -> int:
    """The output tile width of the kernel configuration this module's calls use."""
    return kernels.config(isinstance(module, Fp8Linear))[1]


def _float_shapes(module: nn.Module) -> bool:
    """``kernels.on_float_shapes`` for the module's GPU (the current one while it is elsewhere)."""
    w = getattr(module, "weight", None)
    device = w.device if isinstance(w, Tensor) and w.device.type == "cuda" else None
    return kernels.available() and kernels.on_float_shapes(device)


def _fusable(module: nn.Module, float_shapes: bool) -> bool:
    """A layer whose forward the fused kernels stand in for: an Fp8Linear (or a plain Linear where
    float bases take the kernel: ``float_shapes``, or opted in), with no other wrapper already on
    its forward, where Triton and CUDA are present."""
    kinds = (Fp8Linear, nn.Linear) if kernels.on_float_bases() or float_shapes else (Fp8Linear,)
    return (
        kernels.available()
        and kernels.fuses_adapters()
        and type(module) in kinds
        and "forward" not in module.__dict__
    )


def _trains(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (no other wrapper on its forward) where the training kernels run
    (``kernels.trains``): trained LoRAs on it may take them."""
    return kernels.trains() and type(module) is nn.Linear and "forward" not in module.__dict__


def _accumulable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass with its own forward), no other wrapper on its forward:
    its base GEMM can run after the adapters, accumulating into their output."""
    return kernels.accumulates() and type(module) is nn.Linear and "forward" not in module.__dict__


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, ModuleBypass] = weakref.WeakKeyDictionary()


def attach(module: nn.Module, name: str, op: LayerOp, entry: Entry) -> None:
    """Add ``entry`` to the module's hook, creating the hook on first use."""
    runner = _ACTIVE.get(module)
    if runner is None:
        runner = _ACTIVE[module] = ModuleBypass(module, name, op)
    runner.entries.append(entry)
    runner.warm()


def detach(module: nn.Module, entry: Entry) -> None:
    """Remove ``entry``; the hook goes when its last entry does."""
    runner = _ACTIVE.get(module)
    if runner is None:
        return
    runner.entries = [e for e in runner.entries if e is not entry]
    runner.warm()
    if not runner.entries:
        runner.close()
        del _ACTIVE[module]


def runners(module: nn.Module) -> ModuleBypass | None:
    """The bypass runner on ``module``, if any (for inspection and tests)."""
    return _ACTIVE.get(module)
