"""Bypass training: fresh adapters beside a frozen (possibly quantized) base, trained in place.

``create`` binds new trainable adapters (standard inits: LoRA B = 0, OFT/BOFT identity, LoHa and
LoKr as LyCORIS starts them) to the chosen modules — on a fused module one adapter per slice, so
the result saves under the split names users share; ``train`` runs the loop; ``save`` writes any
format loraplug reads. No copy of a base weight is made; only adapter tensors require grad.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .adapters import Adapter, AdapterSet
from .api import Handle, apply
from .arch import ModelIndex, Target
from .errors import LoraplugError
from .runtime.quant import float_weight

ATTN = r"(^|\.)(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out|q_proj|k_proj|v_proj|out_proj|o_proj|qkv|proj)$"
MLP = (r"(^|\.)(ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|proj_out|linear1|"
       r"linear2|fc1|fc2|w1|w2|w3|linear_in|linear_out|(img_|txt_)?mlp\.\d)$")  # fmt: skip
PRESETS = {"attn": [ATTN], "mlp": [MLP], "attn+mlp": [ATTN, MLP], "all-linear": [r".*"]}


# What the memory-saving step (``train(save_memory=True)``) keeps from the forward: the outputs
# of GEMMs, convolutions and attention, of random operators and of every operator outside aten
# (loraplug's kernels, a quantized base's own); everything else (norms, activations, modulation,
# concatenation: cheap elementwise work) is recomputed in the backward
_KEPT_ATEN = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_mm", "_int_mm",
              "_weight_int8pack_mm", "_weight_int4pack_mm"}  # fmt: skip


def keep_or_recompute(ctx, op, *args, **kwargs):
    """The selective-checkpoint policy of ``saving_memory`` for one operator call (public, so
    that a custom policy can defer to it, as ``loraplug.bench.recompute_reshaping`` does)."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = getattr(op, "_opname", "")
    kept = (
        getattr(op, "namespace", "") != "aten"
        or name in _KEPT_ATEN
        or "attention" in name
        or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())
    )
    return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a diffusers model names in ``_repeated_blocks`` (none for other models)."""
    kinds = set(getattr(model, "_repeated_blocks", None) or ())
    return [m for m in model.modules() if type(m).__name__ in kinds]


@contextlib.contextmanager
def saving_memory(model: nn.Module, enabled: bool = True, policy: Callable = keep_or_recompute):
    """While inside, each of the model's repeated blocks (else the whole model) runs under
    selective activation checkpointing (``policy``, by default ``keep_or_recompute``: the backward
    recomputes the cheap elementwise tensors instead of keeping them, never a GEMM or attention).
    Eager or compiled (the policy is traced into the graph); the modules' own ``forward`` comes
    back at exit."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context = functools.partial(create_selective_checkpoint_contexts, policy)
    units = _repeated_blocks(model) or [model]
    # a forward set on the instance itself (accelerate's hooks) is put back as it was
    own_forwards = [(unit, unit.__dict__.get("forward")) for unit in units]
    for unit in units:
        forward = unit.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=context, **kwargs)

        unit.forward = checkpointed
    try:
        yield
    finally:
        for unit, own in own_forwards:
            if own is None:
                del unit.forward
            else:
                unit.forward = own


class TrainHandle(Handle):
    """A Handle whose adapters were created for training: ``parameters()`` are what to optimise."""

    def parameters(self) -> list[nn.Parameter]:
        return [t for a in self.adapters[0].adapters.values() for t in a.tensors.values() if t.requires_grad]

    def __getstate__(self) -> dict:
        """Pickled with its model (``pickle.dumps((model, handle))``): the model in place of the
        weak reference."""
        state = dict(self.__dict__)
        state["model_ref"] = self.model_ref()
        return state

    def __setstate__(self, state: dict) -> None:
        model = state.pop("model_ref")
        self.__dict__.update(state)
        self.model_ref = weakref.ref(model) if model is not None else (lambda: None)


@dataclass
class TrainResult:
    """What training returns: the adapters (as a peft-format state dict and as an AdapterSet to
    ``lp.save`` in any format) and the loss of every step."""

    adapters: AdapterSet
    losses: list[float] = field(default_factory=list)

    @property
    def state_dict(self) -> dict[str, Tensor]:
        from .formats.write import to_state_dict

        return to_state_dict(_detached(self.adapters), "peft")[0]


def _detached(adapters: AdapterSet) -> AdapterSet:
    out = {k: dataclasses.replace(a, tensors={n: t.detach().clone() for n, t in a.tensors.items()})
           for k, a in adapters.adapters.items()}  # fmt: skip
    return dataclasses.replace(adapters, adapters=out)


def select_targets(model: nn.Module, targets: str | list[str]) -> dict[str, list[Target]]:
    """Module names (and fused-slice aliases) matching a preset or regexes, one name per target:
    a module's own name before its aliases, slices of a fused module instead of the whole module
    (to_q/to_k/to_v, not to_qkv), never a name that spreads over several modules."""
    patterns = PRESETS.get(targets, [targets]) if isinstance(targets, str) else list(targets)
    index = ModelIndex(model)
    chosen = {n: ts for n, ts in index.entries.items()
              if any(re.search(p, n) for p in patterns) and all(t.rows is None for t in ts)
              and (n in index.ops or any(t.size is not None for t in ts))  # own names, or fused slices
              and all(index.ops[t.module].kind in ("linear", "conv") for t in ts)}  # fmt: skip
    sliced = {t.module for ts in chosen.values() for t in ts if t.size is not None}
    seen: dict[tuple, str] = {}
    for name in sorted(chosen, key=lambda n: (n not in index.ops, n)):  # a module's own name first
        ts = chosen[name]
        if any(t.size is None and t.module in sliced for t in ts):
            continue
        seen.setdefault(tuple(ts), name)
    if not seen:
        raise LoraplugError(f"targets={targets!r} match no Linear/Conv module of this model.")
    return {name: list(ts) for ts, name in seen.items()}


def _factor(dim: int, limit: int | None = None) -> tuple[int, int]:
    """dim = m·n with m ≤ n as balanced as possible (m ≤ limit when given)."""
    m = max(d for d in range(1, int(math.isqrt(dim)) + 1) if dim % d == 0 and (limit is None or d <= limit))
    return m, dim // m


def _kaiming(shape, generator) -> Tensor:
    t = torch.empty(shape)
    bound = 1 / math.sqrt(math.prod(shape[1:]))  # kaiming_uniform(a=√5)
    return t.uniform_(-bound, bound, generator=generator)


def init_tensors(algo: str, op, size: int, rank: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Fresh tensors for one target (``size`` output rows) with the algorithm's standard init."""
    fan_in = op.in_features // op.groups
    kernel = op.kernel
    if algo == "lora":
        return {
            "down": _kaiming((rank, fan_in, *kernel), generator),
            "up": torch.zeros(size, rank, *([1] * len(kernel))),
        }
    if algo == "loha":
        flat = fan_in * math.prod(kernel)
        return {"hada_w1_a": torch.zeros(size, rank), "hada_w1_b": torch.randn(rank, flat, generator=generator),
                "hada_w2_a": torch.randn(size, rank, generator=generator) * 0.1,
                "hada_w2_b": torch.randn(rank, flat, generator=generator)}  # fmt: skip
    if algo == "lokr":
        (a, b), (c, d) = _factor(size), _factor(fan_in)
        out = {"lokr_w1": _kaiming((a, c), generator)}
        if rank < max(b, d) / 2:
            out.update(
                lokr_w2_a=_kaiming((b, rank), generator), lokr_w2_b=torch.zeros(rank, d * math.prod(kernel))
            )
        else:
            out["lokr_w2"] = torch.zeros(b, d, *kernel)
        return out
    if algo == "oft":
        block = _factor(size, rank)[0] if size % rank else rank
        return {"oft_blocks": torch.zeros(size // block, block, block)}
    if algo == "boft":
        for block in range(rank - rank % 2, 1, -2):
            n = size // block
            if size % block == 0 and n & (n - 1) == 0:
                stages = bin(n - 1).count("1") + 1
                return {"oft_blocks": torch.zeros(stages, n, block, block)}
        raise LoraplugError(
            f"BOFT needs an even block size ≤ {rank} with a power-of-two number of blocks of {size} rows."
        )
    raise LoraplugError(
        f"algo={algo!r}: loraplug trains lora, loha, lokr, oft and boft (dora=True for DoRA)."
    )


INITS = ("standard", "gaussian", "random")


def _reinit(
    tensors: dict[str, Tensor], algo: str, init: str, rank: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """``standard``: the algorithm's own init (the model starts unchanged); ``gaussian``: LoRA's
    down projection ~ N(0, 1/rank), up zero (PEFT's "gaussian"); ``random``: every tensor
    ~ N(0, 0.01), so the model starts changed (tests, benchmarks)."""
    if init not in INITS:
        raise LoraplugError(f"init={init!r}; use one of {', '.join(INITS)}.")
    if init == "gaussian" and algo == "lora":
        tensors["down"] = torch.randn(tensors["down"].shape, generator=generator) / rank
    if init == "random":
        tensors = {k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in tensors.items()}
    return tensors


def create(
    model: nn.Module,
    algo: str = "lora",
    rank: int = 16,
    alpha: float | None = None,
    targets: str | list[str] = "attn",
    *,
    init: str = "standard",
    dora: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TrainHandle:
    """Trainable adapters in bypass mode on ``model`` (frozen, any weight type).

    ``targets``: a preset ("attn", "mlp", "attn+mlp", "all-linear") or regexes on module names;
    fused modules get one adapter per slice. ``alpha`` defaults to the rank (scale 1). ``init``:
    "standard" (LoRA B = 0, OFT identity, LoHa/LoKr as LyCORIS: the model starts unchanged),
    "gaussian" (PEFT's: LoRA A ~ N(0, 1/r)), "random" (every tensor small and random).
    ``dtype``: the adapters' parameters (float32 masters by default; ``torch.bfloat16`` halves
    their memory and the optimizer's, as diffusers' ``add_adapter`` keeps PEFT's adapters).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):
        raise LoraplugError(
            f"dtype={dtype}: adapters train in float32, bfloat16 or float16 (never in 8-bit formats, "
            "whatever the base's weights are)."
        )
    generator = torch.Generator().manual_seed(seed)
    index = ModelIndex(model)
    adapters = {}
    for name, ts in select_targets(model, targets).items():
        target = ts[0]
        op = index.ops[target.module]
        size = op.out_features if target.size is None else target.size
        tensors = _reinit(init_tensors(algo, op, size, rank, generator), algo, init, rank, generator)
        if dora:
            if algo not in ("lora", "loha", "lokr"):
                raise LoraplugError("dora=True goes with lora, loha or lokr.")
            weight = float_weight(index.modules[target.module], target.module)
            weight = weight if target.size is None else weight.narrow(0, target.offset, target.size)
            tensors["magnitude"] = weight.reshape(size, -1).norm(dim=1)
        device = index.modules[target.module].weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        params = {k: nn.Parameter(v.float().to(device=device, dtype=dtype)) for k, v in tensors.items()}
        adapters[name] = Adapter(name, algo, params, alpha=float(alpha if alpha is not None else rank))
    adapter_set = AdapterSet(
        adapters, "loraplug", {"loraplug_algo": algo, "loraplug_rank": str(rank)}, name=algo
    )
    model.requires_grad_(False)
    handle = apply(model, adapter_set)
    handle.__class__ = TrainHandle
    handle.model_ref = weakref.ref(model)
    return handle


def _compile(model: torch.nn.Module, mode: bool | str, regional: bool) -> list[torch.nn.Module]:
    """torch.compile the model, or each of its repeated blocks; the modules compiled."""
    mode = mode if isinstance(mode, str) else None
    if not regional:
        model.compile(mode=mode)
        return [model]
    blocks = _repeated_blocks(model)
    if not blocks:
        raise LoraplugError(
            f"regional=True: {type(model).__name__} names no repeated blocks (diffusers models list them "
            "in `_repeated_blocks`); use compile= alone to compile the whole model."
        )
    for block in blocks:
        block.compile(mode=mode)
    return blocks


def train(
    handle: TrainHandle,
    batches: Iterable,
    loss_fn: Callable[[object], Tensor],
    steps: int,
    lr: float = 1e-4,
    *,
    optimizer: str | Callable = "adamw",
    weight_decay: float = 0.0,
    grad_accum: int = 1,
    schedule: str = "constant",
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    compile: bool | str = False,
    regional: bool = False,
    save_memory: bool = False,
) -> TrainResult:
    """Optimise the handle's adapters for ``steps`` steps of ``grad_accum`` batches each.

    ``loss_fn(batch)`` runs the model and returns a scalar; ``schedule`` is "constant" or "cosine"
    (to zero over ``steps``); ``autocast_dtype`` runs the loss in mixed precision. Deterministic for a seed; with
    ``checkpoint`` the adapters, optimiser state and losses are saved at the end (and loaded
    again with ``resume=`` to continue). ``compile=True`` runs the model under ``torch.compile``
    while training (one graph with the adapters inside; undone at the end); a string is
    torch.compile's mode, e.g. ``"reduce-overhead"`` (CUDA graphs: no host cost per kernel launch).
    ``regional=True`` compiles each of the model's repeated blocks instead of the whole model (the
    block kinds a diffusers model names in ``_repeated_blocks``, e.g. Flux's two): one compile per
    block kind, minutes less at full depth. ``save_memory=True`` runs each repeated block (else the
    model) under selective activation checkpointing: the backward recomputes the cheap elementwise
    tensors (norms, activations, modulation, concatenation) instead of keeping them from the
    forward, never a GEMM or attention. On Flux-dev (H100, 512², compiled with CUDA graphs) the
    step's peak fell from 34.18 to 29.90 GB (0.886× PEFT's) for 6.1 % more device time.
    """
    if regional and not compile:
        raise LoraplugError("regional=True compiles the model's blocks: pass compile=True (or a mode) too.")
    modes = (True, False, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if compile not in modes:
        raise LoraplugError(
            f"compile={compile!r}: use True/False or a torch.compile mode ({', '.join(map(repr, modes[2:]))})."
        )
    torch.manual_seed(seed)
    params = handle.parameters()
    # fused AdamW on CUDA: one kernel for all adapters (foreach launches several per parameter group)
    fused = bool(params) and all(p.is_cuda for p in params)
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else optimizer(params))  # fmt: skip
    if schedule not in ("constant", "cosine"):
        raise LoraplugError(f"schedule={schedule!r}; use 'constant' or 'cosine'.")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt,
        (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        if schedule == "cosine"
        else (lambda step: 1.0),
    )
    losses: list[float] = []
    start = 0
    if resume is not None:
        state = torch.load(str(resume), map_location="cpu", weights_only=True)
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        losses, start = list(state["losses"]), int(state["step"])
    data = cycle(batches) if not hasattr(batches, "__next__") else batches
    for _ in range(start * grad_accum):  # a resumed run continues where the data left off
        next(data)
    bar = tqdm(range(start, steps), desc="training", disable=not progress, initial=start, total=steps)
    device = params[0].device.type if params else "cpu"
    model = getattr(handle, "model_ref", lambda: None)() if compile or save_memory else None
    if (compile or save_memory) and model is None:
        option = "compile=True" if compile else "save_memory=True"
        raise LoraplugError(f"{option} needs the handle lp.create returned (it knows the model).")
    compiled = _compile(model, compile, regional) if compile else []
    pending = None  # the last step's loss, read after the next step is queued (no stall per step)
    graphs = compile in ("reduce-overhead", "max-autotune")  # CUDA graphs (on CUDA)
    try:
        with saving_memory(model, save_memory):
            for _ in bar:
                total = torch.zeros((), device=params[0].device if params else "cpu")
                for micro in range(grad_accum):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        loss = loss_fn(next(data)) / grad_accum
                    loss.backward()
                    total += loss.detach().float()
                    if graphs and micro == 0 and grad_accum > 1:
                        _own_gradients(params)
                opt.step()
                scheduler.step()
                opt.zero_grad(set_to_none=True)
                if pending is not None:
                    _record(losses, pending, bar)
                pending = total
            if pending is not None:
                _record(losses, pending, bar)
    finally:
        for module in compiled:
            module._compiled_call_impl = None  # back to the eager module
    if checkpoint is not None:
        state = {"params": [p.detach() for p in params], "optimizer": opt.state_dict(), "losses": losses,
                 "step": steps, "scheduler": scheduler.state_dict()}  # fmt: skip
        torch.save(state, str(checkpoint))
    return TrainResult(handle.adapters[0], losses)


def _own_gradients(params: list[Tensor]) -> None:
    """Copy gradients out of CUDA-graph memory: the next replay reuses it, and accumulating the
    next micro-batch into it raised ("accessing tensor output of CUDAGraphs that has been
    overwritten")."""
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.clone()


def _record(losses: list[float], loss: Tensor, bar) -> None:
    losses.append(loss.item())
    bar.set_postfix(loss=f"{losses[-1]:.4g}")


def flow_matching_loss(
    transformer: nn.Module,
    latents: Tensor,
    generator: torch.Generator | None = None,
    **conditioning,
) -> Tensor:
    """Rectified-flow loss of a Flux-style transformer: x_t = (1 − t)·x₀ + t·ε, target v = ε − x₀,
    t ~ logit-normal (as Flux trainers sample it); ``conditioning`` goes to the transformer
    (encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance…)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    t = torch.sigmoid(torch.randn(latents.shape[0], generator=generator)).to(latents)
    x_t = (1 - t[:, None, None]) * latents + t[:, None, None] * noise
    prediction = transformer(hidden_states=x_t, timestep=t, return_dict=False, **conditioning)[0]
    return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
