"""Triton kernels for training low-rank adapters beside a frozen float ``nn.Linear`` (imported only
when one runs). One module's adapters — one per output slice, all of rank r, stacked: ``down``
(R = slices·r, K), ``up`` (N, r), row n of ``up`` the up row of output column n, whose ranks start
at column ``col_rank[n]`` of h — run per step as

    forward    h = (x·downᵀ)·s              chunks of the reduction over K, then added in order
               y = h ⊛ up + bias + x·Wᵀ      one tiled kernel, then cuBLAS accumulating into it
    backward   g = (dy ⊛ upᵀ)·s             chunks over N, then added in order
               dx = g·down + dy·W            one tiled kernel, then cuBLAS accumulating into it
               d up = dyᵀ ⊛ h, d down = gᵀ·x one kernel: a program per block of columns

where ``a ⊛ up`` multiplies each output column by its own slice's ranks. Every operand is read in
its own dtype (float32 masters included: no cast kernels), the gradients are written in the
parameters' dtype, and every sum is taken in a fixed order (deterministic). The portable path runs
the same adapters as six cuBLAS GEMMs plus casts and scalings per layer, the skinny ones at 6–8 µs
each where their bytes take 3 (benchmarks/README.md, session 10). A first version with one program
per block of rows for h/y₀ and g/dx₀ ran 2× slower than the portable path (a long serial loop per
program: 96 programs for 1536 rows): every kernel here spreads over the whole GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import sm_count
from .train_gemm import define_pair
from .triton_kernels import _LIB, _Binaries, _cdiv


@triton.jit
def _up_tile(up_ptr, crs_ptr, rk, rn, N, r):
    """The (RP, BN) block of the module's block-structured up projection for output columns ``rn``
    (one slice: slices start on multiples of the widest block): entry (k, n) is up[n, k − c] where
    that lies in [0, r), c the slice's first rank; else 0."""
    j = rk - tl.load(crs_ptr + tl.min(rn, 0))
    inside = ((j >= 0) & (j < r))[:, None] & (rn < N)[None, :]
    return tl.load(up_ptr + rn[None, :].to(tl.int64) * r + j[:, None], mask=inside, other=0.0)


@triton.jit
def _row_block(ptr, rm, cols, M, C, stride):
    """The (BM, len(cols)) block of a row-major matrix, zero outside it."""
    mask = (rm < M)[:, None] & (cols < C)[None, :]
    return tl.load(ptr + rm[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, rm, cols, M, C, stride):
    mask = (rm < M)[:, None] & (cols < C)[None, :]
    offsets = rm[:, None].to(tl.int64) * stride + cols[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled(acc, rs_ptr, rk, R):
    """acc · s, column by column (each rank's scale·strength)."""
    return acc * tl.load(rs_ptr + rk, mask=rk < R, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _operand_block(b_ptr, crs_ptr, rk, cols, C, R, r, UP: tl.constexpr):
    """The (RP, len(cols)) block of the right-hand operand: the block-structured up projection
    (``UP``: columns are output columns) or the stacked down projection (columns are inputs)."""
    if UP:
        block = _up_tile(b_ptr, crs_ptr, rk, cols, C, r)
    else:
        block = _row_block(b_ptr, rk, cols, R, C, C)
    return block


@triton.jit
def _partial_kernel(
    a_ptr, b_ptr, crs_ptr, p_ptr, M, C, R, r, stride_a, CHUNK,
    UP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """P[s] = a[:, chunk s] · B[chunk s]ᵀ for BM rows: x·downᵀ (h) or dy ⊛ upᵀ (g) summed over
    one chunk of the reduction; the chunks are added in order by ``_reduce_kernel``."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    chunk = tl.program_id(1)
    rk = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for c0 in range(chunk * CHUNK, min(chunk * CHUNK + CHUNK, C), BC):
        cols = c0 + tl.arange(0, BC)
        a = _row_block(a_ptr, rm, cols, M, C, stride_a)
        acc = tl.dot(a, tl.trans(_operand_block(b_ptr, crs_ptr, rk, cols, C, R, r, UP).to(a.dtype)), acc)
    _store_rows(p_ptr + chunk * M * RP, acc, rm, rk, M, RP, RP)


@triton.jit
def _reduce_kernel(p_ptr, rs_ptr, out_ptr, M, R, CHUNKS, BM: tl.constexpr, RP: tl.constexpr):
    """out = (Σ chunks P) · s, in out's dtype."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for chunk in range(0, CHUNKS):
        acc += _row_block(p_ptr + chunk * M * RP, rm, rk, M, RP, RP)
    _store_rows(out_ptr, _scaled(acc, rs_ptr, rk, R), rm, rk, M, R, R)


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, crs_ptr, bias_ptr, out_ptr, M, C, R, r,
    UP: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """out = h · B (+ bias) for one (BM, BN) tile: h ⊛ up (y₀) or g·down (dx₀)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, RP)
    h = _row_block(h_ptr, rm, rk, M, R, R)
    out = tl.dot(h, _operand_block(b_ptr, crs_ptr, rk, cols, C, R, r, UP).to(h.dtype))
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    _store_rows(out_ptr, out, rm, cols, M, C, C)


@triton.jit
def _summed_over_rows(a_ptr, a_cols, A_WIDTH, stride_a, b_ptr, b_cols, B_WIDTH, stride_b, M,
                      BM: tl.constexpr, SA: tl.constexpr, SB: tl.constexpr):  # fmt: skip
    """aᵀ·b over every row, for a's columns ``a_cols`` (SA of them) and b's ``b_cols`` (SB)."""
    acc = tl.zeros((SA, SB), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        a = _row_block(a_ptr, rm, a_cols, M, A_WIDTH, stride_a)
        acc = tl.dot(tl.trans(a), _row_block(b_ptr, rm, b_cols, M, B_WIDTH, stride_b), acc)
    return acc


@triton.jit
def _grad_up_block(dy_ptr, h_ptr, crs_ptr, dup_ptr, pid, M, N, R, r, stride_dy,
                   BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):  # fmt: skip
    """d up = dyᵀ ⊛ h for the BN output columns of block ``pid``, summed over every row."""
    rk = tl.arange(0, RP)
    rn = pid * BN + tl.arange(0, BN)
    acc = _summed_over_rows(dy_ptr, rn, N, stride_dy, h_ptr, rk, R, R, M, BM, BN, RP)
    j = rk - tl.load(crs_ptr + pid * BN)  # column k of this block is rank k − c of its slice
    inside = (rn < N)[:, None] & ((j >= 0) & (j < r))[None, :]
    tl.store(
        dup_ptr + rn[:, None].to(tl.int64) * r + j[None, :], acc.to(dup_ptr.dtype.element_ty), mask=inside
    )


@triton.jit
def _grad_down_block(g_ptr, x_ptr, ddown_ptr, pid, M, K, R, stride_x,
                     BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):  # fmt: skip
    """d down = gᵀ·x for the BK input columns of block ``pid``, summed over every row."""
    rk = tl.arange(0, RP)
    kk = pid * BK + tl.arange(0, BK)
    acc = _summed_over_rows(g_ptr, rk, R, R, x_ptr, kk, K, stride_x, M, BM, RP, BK)
    _store_rows(ddown_ptr, acc, rk, kk, R, K, K)


@triton.jit
def _grad_weights_kernel(
    dy_ptr, h_ptr, crs_ptr, g_ptr, x_ptr, dup_ptr, ddown_ptr,
    M, N, K, R, r, stride_dy, stride_x, UP_BLOCKS,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """The first UP_BLOCKS programs: blocks of d up; the rest: blocks of d down."""
    pid = tl.program_id(0)
    if pid < UP_BLOCKS:
        _grad_up_block(dy_ptr, h_ptr, crs_ptr, dup_ptr, pid, M, N, R, r, stride_dy, BM, BN, RP)
    else:
        _grad_down_block(g_ptr, x_ptr, ddown_ptr, pid - UP_BLOCKS, M, K, R, stride_x, BM, BK, RP)


_PARTIAL = _Binaries(_partial_kernel)
_REDUCE = _Binaries(_reduce_kernel)
_EXPAND = _Binaries(_expand_kernel)
_GRAD_WEIGHTS = _Binaries(_grad_weights_kernel)
_WIDTH = 64  # columns per step of every loop (and per program of the weights' gradients)


def rank_block(ranks: int) -> int:
    """h's columns as one power-of-two block of at least 16 (the MMA's smallest reduction)."""
    return max(16, 1 << (ranks - 1).bit_length())


def _reduced(
    a: Tensor, b: Tensor, col_rank: Tensor, rank_scale: Tensor, ranks: int, r: int, up: bool
) -> Tensor:
    """(a·Bᵀ)·s, (M, ranks) in a's dtype: the reduction split into chunks over enough programs to
    fill the GPU twice (each chunk's rows one program), then the chunks added in order."""
    m, c = a.shape
    rp = rank_block(ranks)
    bm = 64 if rp <= 128 else 32
    steps = _cdiv(c, _WIDTH)
    chunks = max(1, min(steps, _cdiv(2 * sm_count(a.device), _cdiv(m, bm))))
    per_chunk = _cdiv(steps, chunks) * _WIDTH
    chunks = _cdiv(c, per_chunk)
    partial = a.new_empty(chunks, m, rp, dtype=torch.float32)
    args = (a, b, col_rank, partial, m, c, ranks, r, a.stride(0), per_chunk)
    _PARTIAL.launch((_cdiv(m, bm), chunks), args, dict(UP=up, BM=bm, BC=_WIDTH, RP=rp), 4, 3)
    out = a.new_empty(m, ranks)
    _REDUCE.launch(_cdiv(m, bm), (partial, rank_scale, out, m, ranks, chunks), dict(BM=bm, RP=rp), 4, 1)
    return out


def _expanded(
    h: Tensor, b: Tensor, col_rank: Tensor, bias: Tensor | None, width: int, r: int, up: bool
) -> Tensor:
    """h·B (+ bias), (M, width): h ⊛ up or g·down."""
    m, ranks = h.shape
    rp = rank_block(ranks)
    out = h.new_empty(m, width)
    args = (h, b, col_rank, h if bias is None else bias, out, m, width, ranks, r)
    blocks = dict(UP=up, HAS_BIAS=bias is not None, BM=64, BN=128, RP=rp)
    _EXPAND.launch((_cdiv(m, 64), _cdiv(width, 128)), args, blocks, 4, 1)
    return out


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, col_rank: Tensor,
            rank_scale: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(y, h): y = x·Wᵀ + bias + h ⊛ up with h = (x·downᵀ)·s, for x (M, K) with unit column stride."""
    ranks, r = down.shape[0], up.shape[1]
    h = _reduced(x, down, col_rank, rank_scale, ranks, r, up=False)
    y = _expanded(h, up, col_rank, bias, up.shape[0], r, up=True)
    return y.addmm_(x, weight.t()), h


def backward(dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, down: Tensor, up: Tensor, col_rank: Tensor,
             rank_scale: Tensor, need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """(dx or None, d down, d up) for ``forward``'s output gradient dy (M, N), unit column stride."""
    m, n = dy.shape
    k = x.shape[1]
    ranks, r = down.shape[0], up.shape[1]
    g = _reduced(dy, up, col_rank, rank_scale, ranks, r, up=True)
    dx = _expanded(g, down, col_rank, None, k, r, up=False).addmm_(dy, weight) if need_dx else None
    d_up, d_down = torch.empty_like(up), torch.empty_like(down)
    up_blocks = _cdiv(n, _WIDTH)
    args = (dy, h, col_rank, g, x, d_up, d_down, m, n, k, ranks, r, dy.stride(0), x.stride(0), up_blocks)
    blocks = dict(BM=_WIDTH, BN=_WIDTH, BK=_WIDTH, RP=rank_block(ranks))
    _GRAD_WEIGHTS.launch(up_blocks + _cdiv(k, _WIDTH), args, blocks, 4, 3)
    return dx, d_down, d_up


def _forward_shapes(x, weight, bias, down, up, col_rank, rank_scale):
    return x.new_empty(x.shape[0], up.shape[0]), x.new_empty(x.shape[0], down.shape[0])


def _backward_shapes(dy, x, weight, h, down, up, col_rank, rank_scale, need_dx):
    dx = dy.new_empty(dy.shape[0], x.shape[1]) if need_dx else None
    return dx, torch.empty_like(down), torch.empty_like(up)


# The same two calls as operators for compiled graphs; the autograd Function below calls them there
# and the launchers directly in eager mode.
define_pair(
    _LIB,
    "lora_train",
    (
        "(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up, Tensor col_rank, Tensor rank_scale) "
        "-> (Tensor, Tensor)",
        "(Tensor dy, Tensor x, Tensor weight, Tensor h, Tensor down, Tensor up, Tensor col_rank, "
        "Tensor rank_scale, bool need_dx) -> (Tensor?, Tensor, Tensor)",
    ),
    (forward, backward),
    (_forward_shapes, _backward_shapes),
)


class LoraTrainLinear(torch.autograd.Function):
    """y = x·Wᵀ + bias + Σ slices (x·downᵀ·s) ⊛ up, differentiable in x, down and up (the base is
    frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, col_rank, rank_scale):
        if torch.compiler.is_compiling():
            y, h = torch.ops.loraplug.lora_train(x, weight, bias, down, up, col_rank, rank_scale)
        else:
            y, h = forward(x, weight, bias, down, up, col_rank, rank_scale)
        ctx.save_for_backward(x, weight, h, down, up, col_rank, rank_scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, h, down, up, col_rank, rank_scale = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        need_dx = ctx.needs_input_grad[0]
        if torch.compiler.is_compiling():
            call = torch.ops.loraplug.lora_train_backward
        else:
            call = backward
        dx, d_down, d_up = call(dy, x, weight, h, down, up, col_rank, rank_scale, need_dx)
        return dx, None, None, d_down, d_up, None, None
