"""Triton kernels for training low-rank adapters beside a frozen float ``nn.Linear`` (imported only
when one runs). One module's adapters — one per output slice, all of rank r, stacked: ``down``
(R = slices·r, K), ``up`` (N, r), row n of ``up`` the up row of output column n, whose ranks start
at column ``col_rank[n]`` of h — take three kernels and the two base GEMMs per step:

    forward    h = (x·downᵀ)·s  and  y₀ = h ⊛ up + bias       one kernel (rows of x per program)
               y = y₀ + x·Wᵀ                                   cuBLAS, accumulating into y₀
    backward   g = (dy ⊛ upᵀ)·s  and  dx₀ = g·down            one kernel (rows of dy per program)
               dx = dx₀ + dy·W                                 cuBLAS, accumulating into dx₀
               d up = dyᵀ ⊛ h  and  d down = gᵀ·x              one kernel (columns per program)

where ``a ⊛ up`` multiplies each output column by its own slice's ranks. Every operand is read in
its own dtype (float32 masters included: no cast kernels) and the gradients are written in the
parameters' dtype, each reduction summed by one program in a fixed order (deterministic). The
portable path runs the same adapters as six cuBLAS GEMMs plus casts and scalings per layer
(benchmarks/README.md, session 10: small GEMMs at 6–8 µs each where their bytes take 3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_kernels import _LIB, _Binaries, _cdiv, _sm_count


@triton.jit
def _up_tile(up_ptr, crs_ptr, rk, rn, N, r):
    """The (RP, BN) block of the module's block-structured up projection: entry (k, n) is
    up[n, k − col_rank[n]] where that lies in [0, r), else 0."""
    c = tl.load(crs_ptr + rn, mask=rn < N, other=0)
    j = rk[:, None] - c[None, :]
    inside = (j >= 0) & (j < r) & (rn < N)[None, :]
    return tl.load(up_ptr + rn[None, :].to(tl.int64) * r + j, mask=inside, other=0.0)


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
def _forward_kernel(
    x_ptr, down_ptr, rs_ptr, up_ptr, crs_ptr, bias_ptr, h_ptr, y_ptr,
    M, K, N, R, r, stride_x,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """h = (x·downᵀ)·s for BM rows, then y₀ = h ⊛ up + bias over the whole output width."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        x = _row_block(x_ptr, rm, kk, M, K, stride_x)
        a = tl.load(down_ptr + rk[None, :].to(tl.int64) * K + kk[:, None], mask=(rk < R)[None, :] & (kk < K)[:, None], other=0.0)  # fmt: skip
        acc = tl.dot(x, a.to(x.dtype), acc)
    h = _scaled(acc, rs_ptr, rk, R).to(h_ptr.dtype.element_ty)
    _store_rows(h_ptr, h, rm, rk, M, R, R)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        out = tl.dot(h, _up_tile(up_ptr, crs_ptr, rk, rn, N, r).to(h.dtype))
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        _store_rows(y_ptr, out, rm, rn, M, N, N)


@triton.jit
def _grad_hidden_kernel(
    dy_ptr, up_ptr, crs_ptr, rs_ptr, down_ptr, g_ptr, dx_ptr,
    M, N, K, R, r, stride_dy,
    DX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """g = (dy ⊛ upᵀ)·s for BM rows, then (``DX``) dx₀ = g·down over the whole input width."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dy = _row_block(dy_ptr, rm, rn, M, N, stride_dy)
        acc = tl.dot(dy, tl.trans(_up_tile(up_ptr, crs_ptr, rk, rn, N, r).to(dy.dtype)), acc)
    g = _scaled(acc, rs_ptr, rk, R).to(g_ptr.dtype.element_ty)
    _store_rows(g_ptr, g, rm, rk, M, R, R)
    if DX:
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            a = _row_block(down_ptr, rk, kk, R, K, K)
            _store_rows(dx_ptr, tl.dot(g, a.to(g.dtype)), rm, kk, M, K, K)


@triton.jit
def _grad_weights_kernel(
    dy_ptr, h_ptr, crs_ptr, g_ptr, x_ptr, dup_ptr, ddown_ptr,
    M, N, K, R, r, stride_dy, stride_x, UP_BLOCKS,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """The first UP_BLOCKS programs: d up = dyᵀ ⊛ h for BN output columns; the rest: d down =
    gᵀ·x for BK input columns; each sums over every row itself."""
    pid = tl.program_id(0)
    rk = tl.arange(0, RP)
    if pid < UP_BLOCKS:
        rn = pid * BN + tl.arange(0, BN)
        acc = tl.zeros((BN, RP), dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            dy = _row_block(dy_ptr, rm, rn, M, N, stride_dy)
            acc = tl.dot(tl.trans(dy), _row_block(h_ptr, rm, rk, M, R, R), acc)
        c = tl.load(crs_ptr + rn, mask=rn < N, other=0)
        j = rk[None, :] - c[:, None]  # column k of this block is rank k − col_rank[n] of row n
        inside = (j >= 0) & (j < r) & (rn < N)[:, None]
        tl.store(dup_ptr + rn[:, None].to(tl.int64) * r + j, acc.to(dup_ptr.dtype.element_ty), mask=inside)
    else:
        kk = (pid - UP_BLOCKS) * BK + tl.arange(0, BK)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            g = _row_block(g_ptr, rm, rk, M, R, R)
            acc = tl.dot(tl.trans(g), _row_block(x_ptr, rm, kk, M, K, stride_x), acc)
        _store_rows(ddown_ptr, acc, rk, kk, R, K, K)


_FORWARD = _Binaries(_forward_kernel)
_GRAD_HIDDEN = _Binaries(_grad_hidden_kernel)
_GRAD_WEIGHTS = _Binaries(_grad_weights_kernel)
_WIDTH = 64  # columns per step of every loop (and per program of the weights' gradients)


def rank_block(ranks: int) -> int:
    """h's columns as one power-of-two block of at least 16 (the MMA's smallest reduction)."""
    return max(16, 1 << (ranks - 1).bit_length())


def _rows_per_program(m: int, rp: int, device: torch.device) -> int:
    """Rows of x (dy) per program: the most that still give every multiprocessor about half a
    program (the row kernels are bandwidth-bound; fewer rows re-read the adapters more often), at
    most 8192 accumulator entries."""
    for bm in (64, 32, 16):
        if bm * rp <= 8192 and _cdiv(m, bm) * 2 >= _sm_count(device):
            return bm
    return 16


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, col_rank: Tensor,
            rank_scale: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(y, h): y = x·Wᵀ + bias + h ⊛ up with h = (x·downᵀ)·s, for x (M, K) with unit column stride."""
    m, k = x.shape
    n, r = up.shape
    ranks = down.shape[0]
    rp = rank_block(ranks)
    bm = _rows_per_program(m, rp, x.device)
    h = x.new_empty(m, ranks)
    y = x.new_empty(m, n)
    args = (x, down, rank_scale, up, col_rank, x if bias is None else bias, h, y, m, k, n, ranks, r, x.stride(0))  # fmt: skip
    blocks = dict(HAS_BIAS=bias is not None, BM=bm, BK=_WIDTH, BN=_WIDTH, RP=rp)
    _FORWARD.launch(_cdiv(m, bm), args, blocks, 4, 3)
    return y.addmm_(x, weight.t()), h


def backward(dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, down: Tensor, up: Tensor, col_rank: Tensor,
             rank_scale: Tensor, need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """(dx or None, d down, d up) for ``forward``'s output gradient dy (M, N), unit column stride."""
    m, n = dy.shape
    k = x.shape[1]
    ranks, r = down.shape[0], up.shape[1]
    rp = rank_block(ranks)
    bm = _rows_per_program(m, rp, dy.device)
    g = dy.new_empty(m, ranks)
    dx = dy.new_empty(m, k) if need_dx else g
    args = (dy, up, col_rank, rank_scale, down, g, dx, m, n, k, ranks, r, dy.stride(0))
    _GRAD_HIDDEN.launch(_cdiv(m, bm), args, dict(DX=need_dx, BM=bm, BN=_WIDTH, BK=_WIDTH, RP=rp), 4, 3)
    d_up, d_down = torch.empty_like(up), torch.empty_like(down)
    up_blocks = _cdiv(n, _WIDTH)
    args = (dy, h, col_rank, g, x, d_up, d_down, m, n, k, ranks, r, dy.stride(0), x.stride(0), up_blocks)
    blocks = dict(BM=_WIDTH, BN=_WIDTH, BK=_WIDTH, RP=rp)
    _GRAD_WEIGHTS.launch(up_blocks + _cdiv(k, _WIDTH), args, blocks, 4, 3)
    return (dx.addmm_(dy, weight) if need_dx else None), d_down, d_up


# The same two calls as operators for compiled graphs (opaque to Inductor: the kernels run as they
# are); the autograd Function below calls them there and the launchers directly in eager mode.
_LIB.define(
    "lora_train_forward(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up, Tensor col_rank, "
    "Tensor rank_scale) -> (Tensor, Tensor)"
)
_LIB.define(
    "lora_train_backward(Tensor dy, Tensor x, Tensor weight, Tensor h, Tensor down, Tensor up, Tensor col_rank, "
    "Tensor rank_scale, bool need_dx) -> (Tensor?, Tensor, Tensor)"
)
_LIB.impl("lora_train_forward", forward, "CompositeExplicitAutograd")
_LIB.impl("lora_train_backward", backward, "CompositeExplicitAutograd")


@torch.library.register_fake("loraplug::lora_train_forward", lib=_LIB)
def _(x, weight, bias, down, up, col_rank, rank_scale):
    return x.new_empty(x.shape[0], up.shape[0]), x.new_empty(x.shape[0], down.shape[0])


@torch.library.register_fake("loraplug::lora_train_backward", lib=_LIB)
def _(dy, x, weight, h, down, up, col_rank, rank_scale, need_dx):
    dx = dy.new_empty(dy.shape[0], x.shape[1]) if need_dx else None
    return dx, torch.empty_like(down), torch.empty_like(up)


class LoraTrainLinear(torch.autograd.Function):
    """y = x·Wᵀ + bias + Σ slices (x·downᵀ·s) ⊛ up, differentiable in x, down and up (the base is
    frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, col_rank, rank_scale):
        if torch.compiler.is_compiling():
            y, h = torch.ops.loraplug.lora_train_forward(x, weight, bias, down, up, col_rank, rank_scale)
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
