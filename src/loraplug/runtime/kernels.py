"""The bypass fast path on CUDA: switches, tile configurations, the packing of up projections, and
the entry points of the Triton kernels (``triton_kernels``, imported only when one runs; Triton is
optional).

``lora_linear`` computes, in one pass over the output,

    y = (x Wᵀ) [· sx ⊗ sw for fp8 operands] + (h · s)[:, run(tile)] P + bias

where h = x·Aᵀ is the down projection of every low-rank adapter of the module (M × Σr), laid out
so that the ranks covering each output tile of width BN are one run of columns starting at
``hstart[tile]``, s the per-rank scale·strength, and P the packed up projections, stored
N-major (RC × N, the output innermost, like the base GEMM's output): ``P[:, tile]`` holds those
ranks' up rows (zero where a rank's slice does not cover a column). The tile's h and P blocks are
moved like the GEMM's own operands (the tensor memory accelerator on Hopper; h is written with a
16-byte row stride, and P's rows are whole 16-byte units for every rank count, so no rank is
padded) and the up projection joins the base GEMM's accumulator in the same MMA: y is written
once, never read back.

The same call computes what the kernel needs: h = x·Aᵀ (a cuBLAS GEMM) and, on an fp8 weight
given bf16/fp16 activations (no ``a_scale``), their per-row quantization (dynamic per-token
scale, one Triton pass over x): one operator per layer in compiled graphs. Measured slower on the
H200 and left out (benchmarks/README.md): h computed inside the quantization pass (Nunchaku's
fusion; 1.6–2× the two kernels' device time: the row scales need the whole row before any e4m3
value, so x is read twice), and Inductor fusing the quantization into the producer of x.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import LoraplugError
from .train_gemm import watched

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# looked up once: inside a compiled graph ``importlib.util.find_spec`` is a function Dynamo skips
# (torch 2.11), which broke the graph at every layer that asked (measured: 34 breaks, 12 blocks)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


# the environment switches and the values each takes (unset: the default)
SETTINGS = {
    "LORAPLUG_KERNELS": ("0", "base", "fp8", "shapes", "all"),
    "LORAPLUG_ACCUMULATE": ("0", "1", "all"),
    "LORAPLUG_TRAIN_GEMM": ("0", "1"),
    "LORAPLUG_TRAIN_KERNELS": ("0", "1"),
}


def setting(name: str) -> str | None:
    """The value of an environment switch (None when unset or empty); a value it does not take is
    a ``LoraplugError`` rather than silently the default."""
    value = os.environ.get(name) or None
    if value is not None and value not in SETTINGS[name]:
        raise LoraplugError(
            f"{name}={value!r} is not a setting; use one of {', '.join(SETTINGS[name])} or unset it"
        )
    return value


def check_settings() -> None:
    """Every environment switch read (at apply, before the model is touched)."""
    for name in SETTINGS:
        setting(name)


def available() -> bool:
    """Triton installed and a CUDA device present (or the Triton interpreter asked for);
    ``LORAPLUG_KERNELS=0`` turns the kernels off (fp8 layers then use ``torch._scaled_mm``, bypass
    the portable path)."""
    if setting("LORAPLUG_KERNELS") == "0" or not TRITON_INSTALLED:
        return False
    return torch.cuda.is_available() or interpreting()


def on_float_bases() -> bool:
    """Whether bf16/fp16 bases take the fused kernel too. By default they do not: on the H200 the
    Triton GEMM trails cuBLAS by more than the fusion saves (benchmarks/README.md); fp8 bases
    do. ``LORAPLUG_KERNELS=all`` opts float bases in (benchmarks, other GPUs), and with them
    every path into the kernels (``here``, ``fuses_in_graphs``)."""
    return setting("LORAPLUG_KERNELS") == "all"


# GPUs on which bf16 bases ran faster with the fused kernel on ``float_shape_fuses``'s shapes than
# on the portable path — full Flux-dev, eager and compiled, each against the portable path in the
# same process (benchmarks/README.md, sessions 9–11, four processes on H100s: device time 1.065
# against 1.10 eager, wall 1.10 against 1.13–1.16 compiled, added memory 1.005× the adapters).
# Not measured on other GPUs (the H200, the H100 PCIe and NVL included: fewer multiprocessors or other
# memory), where it stays opt-in (``LORAPLUG_KERNELS=shapes``). Matched against the device's name.
FLOAT_SHAPES_GPUS = ("H100 80GB HBM3",)


def on_float_shapes(device: torch.device | None = None) -> bool:
    """Whether float bases take the fused kernel on the shapes where it was measured faster than
    the portable path (``float_shape_fuses``), plain Linears only, on Hopper and later: by default
    on the GPUs named in ``FLOAT_SHAPES_GPUS`` (``device``, or the current CUDA device);
    ``LORAPLUG_KERNELS=shapes`` on any GPU; with any other setting (``fp8``: the fused kernel on
    fp8 bases only, float bases on the portable path) never."""
    value = setting("LORAPLUG_KERNELS")
    if value:
        return value == "shapes"
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return False
    name = torch.cuda.get_device_name(device if device is not None else torch.cuda.current_device())
    return any(gpu in name for gpu in FLOAT_SHAPES_GPUS)


def float_shape_fuses(m: int, k: int, n: int, sms: int) -> bool:
    """Whether a bf16/fp16 m × k → n call takes the fused kernel where float bases fuse on the
    measured shapes (``on_float_shapes``):
    a short reduction (k ≤ 4096: the portable path's second pass over y weighs most against a
    short GEMM) and at least two full tiles per multiprocessor (the Triton GEMM trails cuBLAS most
    on few tiles). Measured per Flux-dev layer shape on an H100 (benchmarks/tile_sweep.py, session
    9): fused + down projection 928 µs against the portable 1084 µs on linear1 (4608 × 3072 →
    21504), slower on linear2 (k 15360) and on the 512-token text stream."""
    tiles = config(False)
    return k <= 4096 and -(-m // tiles.bm) * -(-n // tiles.bn) >= 2 * sms


def fuses_adapters() -> bool:
    """Whether adapters join the base GEMM at all; ``LORAPLUG_KERNELS=base`` keeps the Triton fp8
    base GEMM but runs adapters on the portable path (for comparisons)."""
    return setting("LORAPLUG_KERNELS") != "base"


def accumulates(compiling: bool = False) -> bool:
    """Whether a plain float ``nn.Linear`` in eager training runs its base GEMM last, accumulating
    into the adapters' output (the default: adding after the base is out of place there, one more
    copy of y per layer). ``LORAPLUG_ACCUMULATE=0``: never (the base first, the adapters added after
    it, the order every other layer type and eager inference take); ``=all``: in compiled graphs
    too (``compiling``), where by default the adapters' product is added after the base out of
    place, an add Inductor fuses into the next kernel, while its in-place GEMM copies y first
    (measured: benchmarks/README.md)."""
    value = setting("LORAPLUG_ACCUMULATE")
    return value != "0" and (not compiling or value == "all")


def trains_in_one_call() -> bool:
    """Whether trained adapters on a frozen plain ``nn.Linear`` run with its base GEMM as one
    differentiable call (``train_gemm``: both parts of dx from GEMMs accumulating into one output,
    the call opaque to Inductor under torch.compile): the default, measured on an H100 at full
    Flux-dev depth under CUDA graphs 4.7–7.4 % faster per step after ``fuse_qkv_projections()``
    and even on split q/k/v (benchmarks/README.md, session 13); ``LORAPLUG_TRAIN_GEMM=0``:
    autograd through the separate GEMMs."""
    return setting("LORAPLUG_TRAIN_GEMM") != "0"


def here(capability: tuple[int, int]) -> bool:
    """Whether an fp8 base *without* adapters launches the Triton kernels on a GPU of this compute
    capability: always in eager mode; inside a torch.compile graph where layers with adapters take
    the fused operator too (``fuses_in_graphs``: Hopper and later, or ``LORAPLUG_KERNELS=all``).
    On the full Flux-dev transformer under CUDA graphs (H100, session 23) the fp8 base alone ran
    at 0.752 of the bf16 base on the Triton kernels (device time 0.743) against 0.838 (0.835) for
    ``torch._scaled_mm`` with the quantization fused by Inductor, which graphs before Hopper keep
    (benchmarks/README.md)."""
    return not torch.compiler.is_compiling() or fuses_in_graphs(capability)


def fuses_in_graphs(capability: tuple[int, int]) -> bool:
    """Whether a compiled graph calls the fused operator for a layer's adapters on a GPU of this
    compute capability: on Hopper and later, where the kernel moves its operands by TMA and was
    measured (fp8 + LoRA 0.883 of the compiled bf16 Flux-dev, against 0.94–0.98 for
    ``torch._scaled_mm`` with the portable LoRA). Before Hopper it falls back to pointer loads
    (41 % slower than TMA on the H200) and was never measured against cuBLAS, so graphs keep
    ``_scaled_mm`` with the portable LoRA there, unless ``LORAPLUG_KERNELS=all``."""
    return has_tma(capability) or on_float_bases()


def trains() -> bool:
    """Whether trained LoRAs on a plain bf16/fp16 ``nn.Linear`` run through the training kernels
    (``train_kernels``: five small Triton kernels and the two base GEMMs per layer and step, the
    adapters read in their own dtype) where Triton and CUDA are present: opt-in,
    ``LORAPLUG_TRAIN_KERNELS=1``, until a full training step has been measured faster with them
    (benchmarks/README.md, sessions 12–13: per layer on an H100 they beat the portable path on the
    single-slice layers and lose on fused q/k/v, 2468 against 2410 µs over the eight Flux-dev
    shapes); otherwise the portable path (cuBLAS GEMMs, autograd
    through casts and scalings)."""
    return available() and setting("LORAPLUG_TRAIN_KERNELS") == "1"


TRAIN_SLICE_ALIGN = 128  # the training kernels' widest block of output columns


def supports_training(k: int, n: int, offsets: list[int]) -> bool:
    """Layers the training kernels take: rows of whole 16-byte units (K and N multiples of 8), each
    output slice starting on a multiple of ``TRAIN_SLICE_ALIGN`` (every block of columns lies in
    one slice: Flux's q/k/v of 3072 do)."""
    return k % 8 == 0 and n % 8 == 0 and all(o % TRAIN_SLICE_ALIGN == 0 for o in offsets)


_SM_COUNTS: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (a few under the interpreter), looked up once per device
    (a plain dict: Dynamo traces it without the warning a ``functools.cache`` wrapper gives)."""
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        )
    return _SM_COUNTS[device]


def interpreting() -> bool:
    """Whether Triton runs interpreted on the CPU (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def lora_train_linear(x, weight, bias, down, up, col_rank, rank_scale):
    """x·Wᵀ + bias + the module's trained LoRAs (stacked: see ``train_kernels``), differentiable in
    x and the adapters."""
    from .train_kernels import LoraTrainLinear

    return LoraTrainLinear.apply(x, weight, bias, down, up, col_rank, rank_scale)


def has_tma(capability: tuple[int, int]) -> bool:
    """The tensor memory accelerator (the kernel's fast variant): Hopper (sm_90) and later."""
    return capability >= (9, 0)


def ops():
    """The ``torch.ops.loraplug`` namespace with the Triton kernels registered (imports Triton)."""
    from . import triton_kernels  # noqa: F401  (registers the custom ops)

    return torch.ops.loraplug


class Tiles(NamedTuple):
    """A kernel configuration: output tile BM × BN, reduction step BK, warps, pipeline stages, TMA
    (the persistent Hopper kernel) or pointer loads, whether the persistent kernel's tile loop is
    flattened into its K loop (one software pipeline across tiles), whether its TMA descriptors
    are made on the device (cheap launches) or encoded by the host at every launch, whether the
    tile loop is warp-specialized (Triton's producer/consumer partitions; not with flatten on
    Hopper)."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    tma: bool
    flatten: bool = True
    device_desc: bool = True
    ws: bool = False


# the fastest measured on an H200 (benchmarks/linear_stack.py, kernel_parts.py, tile_sweep.py);
# "*_narrow": for outputs with fewer full tiles than two per multiprocessor (Flux's 512 text
# tokens), half-width tiles over the same packing (None: never). Warp-specialized narrow tiles
# (0.74–0.81 of the compiled bf16 base at Flux-dev depth, against 0.815 flattened) write NaN into
# the first column of some tiles whenever the LoRA tail runs, with P N-major (sessions 9–10) and
# K-major alike (H100 and H200 in sessions 9–10, the H200 in session 15; Triton 3.6:
# benchmarks/ws_probe.py): not used.
CONFIGS = {
    "bf16": Tiles(128, 256, 64, 8, 3, True, False),
    "fp8": Tiles(128, 256, 128, 8, 3, True, True),
    "bf16_narrow": Tiles(128, 128, 64, 4, 4, True, True),
    "fp8_narrow": Tiles(128, 128, 128, 4, 4, True, True),
}


def config(fp8: bool) -> Tiles:
    """The tile configuration for bf16/fp16 or fp8 operands (benchmarks may rewrite CONFIGS); its
    tile width is the one adapters are packed for."""
    return Tiles(*CONFIGS["fp8" if fp8 else "bf16"])


def config_for(fp8: bool, m: int, n: int, sms: int) -> Tiles:
    """The configuration for an m × n output on ``sms`` multiprocessors: ``config(fp8)``, or its
    narrow variant where the full tiles would number fewer than two per multiprocessor (a wave
    and a fraction leaves most of them idle at the end; measured 5–36 % faster on such shapes)
    and its tile width divides the packing's (the kernel reads the packed runs of the wider tile
    holding each narrow one)."""
    tiles = config(fp8)
    narrow = CONFIGS.get("fp8_narrow" if fp8 else "bf16_narrow")
    if narrow is None or -(-m // tiles.bm) * -(-n // tiles.bn) >= 2 * sms:
        return tiles
    narrow = Tiles(*narrow)
    return narrow if narrow.bn < tiles.bn and tiles.bn % narrow.bn == 0 else tiles


def supports(k: int, n: int) -> bool:
    """Shapes the kernel covers: the reduction length a multiple of every BK used, and output rows
    of whole 16-byte units (the tensor memory accelerator moves the output by rows)."""
    return k % 128 == 0 and n % 8 == 0


@dataclass
class Packing:
    """A module's low-rank adapters laid out for the fused kernel at one tile width.

    ``columns``: for each column of h the stacked rank it computes, so that the ranks of every
    output tile are one contiguous run of h's columns; None when that is the stacked order itself
    (the common case; a whole-output adapter beside slice adapters repeats columns). ``packed``
    (RC, N), N-major: row j of tile t's columns multiplies the j-th column of the tile's run (zero
    past the run and outside each slice); RC is the most ranks any tile reads (no padding).
    ``hstart``: where each tile's run starts, (tiles,) int32 when every run starts on the
    tensor memory accelerator's 16-byte grid (a multiple of 8 columns), else (tiles, 2): the grid
    line at or below the start and the offset from it (ranks that are not multiples of 8 on
    several slices; the kernel loads h from the grid line and shifts it). ``rows``: the row of
    ``packed`` at which each entry sits in every tile it covers, or None where it moves."""

    columns: list[int] | None
    hstart: Tensor
    packed: Tensor
    rows: list[int] | None


def _place(layout: list[int], cover: list[int]) -> int:
    """Where the entries ``cover`` sit as one run in ``layout`` (extended when needed: reusing the
    longest suffix already there, so that straddling tiles share their neighbours' columns)."""
    n, wanted = len(cover), set(cover)
    for p in range(len(layout) - n + 1):
        if set(layout[p : p + n]) == wanted and len(set(layout[p : p + n])) == n:
            return p
    for k in range(min(n - 1, len(layout)), 0, -1):
        tail = layout[-k:]
        if set(tail) <= wanted and len(set(tail)) == k:
            layout.extend(e for e in cover if e not in tail)
            return len(layout) - n
    layout.extend(cover)
    return len(layout) - n


def pack_ups(
    spans: list[tuple[int, int, int, int]], ups_t: list[Tensor], out_features: int, bn: int
) -> Packing:
    """Lay out the entries ``spans`` ((rank start, rank, output offset, output size)) with up
    projections ``ups_t`` ((rank, size) each) for output tiles of width ``bn`` (see ``Packing``)."""
    tiles = -(-out_features // bn)
    covers = [
        [i for i, (_, _, off, size) in enumerate(spans) if off < min((t + 1) * bn, out_features) and off + size > t * bn]
        for t in range(tiles)
    ]  # fmt: skip
    layout: list[int] = []
    places = [_place(layout, cover) if cover else 0 for cover in covers]
    col_of = [0]
    for e in layout:
        col_of.append(col_of[-1] + spans[e][1])
    columns = [c for e in layout for c in range(spans[e][0], spans[e][0] + spans[e][1])]
    total = sum(rank for _, rank, _, _ in spans)
    rc = max(sum(spans[i][1] for i in cover) for cover in covers)
    ups = [u.detach().cpu() for u in ups_t]
    packed = torch.zeros(rc, out_features, dtype=ups[0].dtype)
    starts = torch.tensor([col_of[place] for place in places], dtype=torch.int32)
    rows: list[set[int]] = [set() for _ in spans]
    for t, (cover, place) in enumerate(zip(covers, places, strict=True)):
        lo, hi, row = t * bn, min((t + 1) * bn, out_features), 0
        for i in layout[place : place + len(cover)]:
            _, rank, off, size = spans[i]
            c0, c1 = max(lo, off), min(hi, off + size)
            packed[row : row + rank, c0:c1] = ups[i][:, c0 - off : c1 - off]
            rows[i].add(row)
            row += rank
    hstart = starts if not (starts % 8).any() else torch.stack([starts - starts % 8, starts % 8], 1)
    device = ups_t[0].device
    return Packing(
        columns=None if columns == list(range(total)) else columns,
        hstart=hstart.to(device),
        packed=packed.to(device),
        rows=[next(iter(r)) for r in rows] if all(len(r) == 1 for r in rows) else None,
    )


def lora_linear(a, weight, bias, h, down_t, hstart, rank_scale, packed, a_scale, w_scale, out_dtype):
    """The fused GEMM, with what it needs computed in the same call: for an fp8 ``weight`` with
    ``a_scale`` None the quantization of ``a``, for ``h`` None the down projection h = a·down_t.
    Direct Triton launches in eager mode (an operator's dispatch costs host time), the registered
    operator under torch.compile (one per layer)."""
    if watched():  # compiled, or under a dispatch mode: the registered operator
        return ops().lora_linear(a, weight, bias, h, down_t, hstart, rank_scale, packed, a_scale, w_scale, out_dtype)  # fmt: skip
    from .triton_kernels import lora_linear_flat

    return lora_linear_flat(
        a, weight, bias, h, down_t, hstart, rank_scale, packed, a_scale, w_scale, out_dtype
    )


def up_views(spans: list[tuple[int, int, int, int]], packing: Packing) -> list[Tensor] | None:
    """Each entry's up projection (rank, size) as a view into ``packing.packed`` (so the portable
    path needs no copy of its own), or None where an entry does not sit on the same rows in every
    tile it covers."""
    if packing.rows is None:
        return None
    return [packing.packed[row : row + rank, off : off + size] for row, (_, rank, off, size) in zip(packing.rows, spans, strict=True)]  # fmt: skip
