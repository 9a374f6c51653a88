"""The bypass fast path on CUDA: switches, tile configurations, the packing of up projections, and
the entry points of the Triton kernels (``triton_kernels``, imported only when one runs; Triton is
optional).

``lora_linear`` computes, in one pass over the output,

    y = (x Wᵀ) [· sx ⊗ sw for fp8 operands] + (h · s)[:, idx] P + bias

where h = x·Aᵀ is the stacked down projection of every low-rank adapter of the module (M × Σr),
s the per-rank scale·strength, and P the packed up projections: for each output tile of width BN,
``idx[tile]`` lists the ranks whose adapters cover that tile and ``P[:, tile]`` their up rows (zero
where a rank's slice does not cover a column). The up projection thus joins the base GEMM's
accumulator: y is written once, never read back.

``quantize_rows`` quantizes activations to fp8 per row (dynamic per-token scale) and can compute
the down projection h = x·Aᵀ in the same pass over x (the Nunchaku fusion; measured slower than a
separate cuBLAS GEMM on the H200, so the runtime does not use it).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def available() -> bool:
    """Triton installed and a CUDA device present (or the Triton interpreter asked for);
    ``LORAPLUG_KERNELS=0`` turns the kernels off (fp8 layers then use ``torch._scaled_mm``, bypass
    the portable path)."""
    if os.environ.get("LORAPLUG_KERNELS") == "0" or not _triton_installed():
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def on_float_bases() -> bool:
    """Whether bf16/fp16 bases take the fused kernel too. By default they do not: on the H200 the
    Triton GEMM trails cuBLAS by more than the fusion saves (benchmarks/README.md); fp8 bases
    do. ``LORAPLUG_KERNELS=all`` opts float bases in (benchmarks, other GPUs)."""
    return os.environ.get("LORAPLUG_KERNELS") == "all"


def fuses_adapters() -> bool:
    """Whether adapters join the base GEMM at all; ``LORAPLUG_KERNELS=base`` keeps the Triton fp8
    base GEMM but runs adapters on the portable path (for comparisons)."""
    return os.environ.get("LORAPLUG_KERNELS") != "base"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def ops():
    """The ``torch.ops.loraplug`` namespace with the Triton kernels registered (imports Triton)."""
    from . import triton_kernels  # noqa: F401  (registers the custom ops)

    return torch.ops.loraplug


# (BM, BN, BK, warps, stages, TMA, tail): the fastest measured on an H200 (benchmarks/
# linear_stack.py, kernel_parts.py). tail: where the LoRA tail joins the accumulator — 0 after the
# K loop (measured fastest), 1 as its initial value (slower: the loop lost its pipelining), 2 its
# operands loaded before the loop and multiplied after (not measured yet)
CONFIGS = {"bf16": (128, 256, 64, 8, 3, True, 0), "fp8": (128, 256, 128, 8, 3, True, 0)}


def config(fp8: bool) -> tuple[int, int, int, int, int, bool, int]:
    """The tile configuration for bf16/fp16 or fp8 operands (benchmarks may rewrite CONFIGS)."""
    return CONFIGS["fp8" if fp8 else "bf16"]


def supports(k: int) -> bool:
    """Shapes the kernel covers: the reduction length a multiple of every BK used."""
    return k % 128 == 0


def pack_ups(
    spans: list[tuple[int, int, int, int]], ups_t: list[Tensor], out_features: int, bn: int
) -> tuple[Tensor, Tensor]:
    """(idx (tiles, RC) int32, P (RC, N)): for each output tile of width ``bn`` the ranks whose
    adapter slice covers some of its columns, and their up rows (zero outside each slice)."""
    tiles = -(-out_features // bn)
    covering = [
        [
            i
            for i, (_, _, off, size) in enumerate(spans)
            if off < min((t + 1) * bn, out_features) and off + size > t * bn
        ]
        for t in range(tiles)
    ]
    rc = max(1, max(sum(spans[i][1] for i in cover) for cover in covering))
    ups = [u.detach().cpu() for u in ups_t]
    idx = torch.zeros(tiles, rc, dtype=torch.int32)
    packed = torch.zeros(rc, out_features, dtype=ups[0].dtype)
    for t, cover in enumerate(covering):
        lo, hi, row = t * bn, min((t + 1) * bn, out_features), 0
        for i in cover:
            start, rank, off, size = spans[i]
            idx[t, row : row + rank] = torch.arange(start, start + rank, dtype=torch.int32)
            c0, c1 = max(lo, off), min(hi, off + size)
            packed[row : row + rank, c0:c1] = ups[i][:, c0 - off : c1 - off]
            row += rank
    return idx.to(ups_t[0].device), packed.to(ups_t[0].device)


def lora_linear(a, weight, bias, h, idx, rank_scale, packed, a_scale, w_scale, out_dtype):
    """The fused GEMM: a direct Triton launch in eager mode (a custom op's dispatch costs more than
    the launch), the registered custom op under torch.compile."""
    if torch.compiler.is_compiling():
        return ops().lora_linear(a, weight, bias, h, idx, rank_scale, packed, a_scale, w_scale, out_dtype)
    from .triton_kernels import lora_linear as launch

    lora = None if h is None else (h, idx, rank_scale, packed)
    return launch(a, weight, bias, lora, None if a_scale is None else (a_scale, w_scale), out_dtype)


def quantize_rows(x: Tensor, down_t: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row fp8 quantization (+ the down projection), eager launch or custom op as above."""
    if torch.compiler.is_compiling():
        q, s, h = ops().quantize_rows(x, down_t)
        return q, s, h if down_t is not None else None
    from .triton_kernels import quantize_rows as launch

    return launch(x, down_t)


def up_views(
    spans: list[tuple[int, int, int, int]], idx: Tensor, packed: Tensor, bn: int
) -> list[Tensor] | None:
    """Each entry's up projection as a view into ``packed`` (so the portable path needs no copy of
    its own), or None where an entry does not sit on the same rows in every tile it covers."""
    table = idx.cpu()
    views = []
    for start, rank, off, size in spans:
        tiles = range(off // bn, -(-(off + size) // bn))
        rows = {int((table[t] == start).nonzero()[0]) for t in tiles}
        if len(rows) != 1:
            return None
        row = rows.pop()
        views.append(packed[row : row + rank, off : off + size])
    return views
