"""The Triton kernels behind ``runtime.kernels`` (imported only when they are about to run)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from .kernels import E4M3, E4M3_MAX, config


@triton.jit
def _tile(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (GROUP_M row tiles share their weight tiles in L2)."""
    num_m = tl.cdiv(M, BM)
    per_group = GROUP_M * tl.cdiv(N, BN)
    first_m = (tile // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _tail_operands(
    pid_n, rm, rn, M, N, RC, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr, stride_it, BR: tl.constexpr
):  # fmt: skip
    """(h·s)[:, idx] and P[:, tile]: the LoRA tail's operands for one output tile."""
    rr = tl.arange(0, BR)
    r_in = rr < RC
    idx = tl.load(idx_ptr + pid_n * stride_it + rr, mask=r_in, other=0)
    rs = tl.load(rs_ptr + idx, mask=r_in, other=0.0).to(tl.float32)
    h = tl.load(
        h_ptr + rm[:, None].to(tl.int64) * stride_hm + idx[None, :],
        mask=(rm < M)[:, None] & r_in[None, :],
        other=0.0,
    )
    h = (h.to(tl.float32) * rs[None, :]).to(p_ptr.dtype.element_ty)
    p = tl.load(
        p_ptr + rr[:, None] * stride_pr + rn[None, :], mask=r_in[:, None] & (rn < N)[None, :], other=0.0
    )
    return h, p


@triton.jit
def _tail(
    pid_n, rm, rn, M, N, RC, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr, stride_it, BR: tl.constexpr
):  # fmt: skip
    """The LoRA tail (h·s)[:, idx]·P of one output tile, in float32."""
    h, p = _tail_operands(
        pid_n, rm, rn, M, N, RC, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr, stride_it, BR
    )
    return tl.dot(h, p)


@triton.jit
def _start(
    pid_n, rm, rn, M, N, RC, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr, stride_it,
    FP8: tl.constexpr, HAS_LORA: tl.constexpr, TAIL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BR: tl.constexpr,
):  # fmt: skip
    """The accumulator's initial value: with TAIL == 1 the LoRA tail, computed before the K loop so
    that its operands are dead when the loop needs the registers (divided by the fp8 scales, which
    the epilogue multiplies back); otherwise zeros."""
    if HAS_LORA and TAIL == 1:
        acc = _tail(
            pid_n, rm, rn, M, N, RC, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr, stride_it, BR
        )
        if FP8:
            sa = tl.load(sa_ptr + rm, mask=rm < M, other=1.0)
            sw = tl.load(sw_ptr + rn, mask=rn < N, other=1.0)
            acc = acc / (sa[:, None] * sw[None, :])
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    return acc


@triton.jit
def _finish(
    acc, pid_n, rm, rn, M, N, RC, bias_ptr, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr,
    stride_it, HAS_BIAS: tl.constexpr, FP8: tl.constexpr, HAS_LORA: tl.constexpr, TAIL: tl.constexpr,
    BR: tl.constexpr,
):  # fmt: skip
    """fp8 rescale, the LoRA tail (TAIL == 0: loaded and multiplied only now), bias."""
    if FP8:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        acc = acc * sa[:, None] * sw[None, :]
    if HAS_LORA and TAIL == 0:
        acc += _tail(
            pid_n, rm, rn, M, N, RC, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr, stride_it, BR
        )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lora_linear_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr,
    M, N, K, RC,
    stride_am, stride_wn, stride_om, stride_hm, stride_pr, stride_it,
    HAS_BIAS: tl.constexpr, FP8: tl.constexpr, HAS_LORA: tl.constexpr, TAIL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One output tile per program, pointer loads (portable Triton; also runs interpreted)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = _start(pid_n, rm, rn, M, N, RC, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm, stride_pr,
                 stride_it, FP8, HAS_LORA, TAIL, BM, BN, BR)  # fmt: skip
    if HAS_LORA and TAIL == 2:  # operands loaded now, their product after the loop
        h_pre, p_pre = _tail_operands(pid_n, rm, rn, M, N, RC, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm,
                                      stride_pr, stride_it, BR)  # fmt: skip
    for _ in range(0, K, BK):  # K is a multiple of BK (checked by the launcher)
        a = tl.load(a_ptrs, mask=(rm < M)[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=(rn < N)[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BK
        w_ptrs += BK
    acc = _finish(acc, pid_n, rm, rn, M, N, RC, bias_ptr, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm,
                  stride_pr, stride_it, HAS_BIAS, FP8, HAS_LORA, TAIL, BR)  # fmt: skip
    if HAS_LORA and TAIL == 2:
        acc += tl.dot(h_pre, p_pre)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _lora_linear_tma_kernel(
    a_desc, w_desc, o_desc, bias_ptr, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr,
    M, N, K, RC, stride_hm, stride_pr, stride_it,
    HAS_BIAS: tl.constexpr, FP8: tl.constexpr, HAS_LORA: tl.constexpr, TAIL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):  # fmt: skip
    """Persistent (one program per SM), tiles moved by the tensor memory accelerator (Hopper)."""
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = _start(pid_n, rm, rn, M, N, RC, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm,
                     stride_pr, stride_it, FP8, HAS_LORA, TAIL, BM, BN, BR)  # fmt: skip
        if HAS_LORA and TAIL == 2:  # operands loaded now, their product after the loop
            h_pre, p_pre = _tail_operands(pid_n, rm, rn, M, N, RC, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm,
                                          stride_pr, stride_it, BR)  # fmt: skip
        for k in range(0, K, BK):
            a = a_desc.load([pid_m * BM, k])
            w = w_desc.load([pid_n * BN, k])
            acc = tl.dot(a, w.T, acc)
        acc = _finish(acc, pid_n, rm, rn, M, N, RC, bias_ptr, sa_ptr, sw_ptr, h_ptr, idx_ptr, rs_ptr, p_ptr, stride_hm,
                  stride_pr, stride_it, HAS_BIAS, FP8, HAS_LORA, TAIL, BR)  # fmt: skip
        if HAS_LORA and TAIL == 2:
            acc += tl.dot(h_pre, p_pre)
        o_desc.store([pid_m * BM, pid_n * BN], acc.to(o_desc.dtype))


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, d_ptr, h_ptr, M, K, R, stride_xm, stride_qm, stride_dk, stride_hm,
    HAS_DOWN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_in = rm < M
    rows = rm[:, None].to(tl.int64)
    amax = tl.zeros((BM,), dtype=tl.float32)
    rr = tl.arange(0, BR)
    r_in = rr < R
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k in range(0, K, BK):  # pass 1: row max and the down projection
        x = tl.load(x_ptr + rows * stride_xm + (k + rk)[None, :], mask=m_in[:, None], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        if HAS_DOWN:
            d = tl.load(d_ptr + (k + rk)[:, None] * stride_dk + rr[None, :], mask=r_in[None, :], other=0.0)
            h = tl.dot(x, d, h)
    scale = tl.maximum(amax, 1e-12) / FMAX
    tl.store(s_ptr + rm, scale, mask=m_in)
    if HAS_DOWN:
        tl.store(
            h_ptr + rows * stride_hm + rr[None, :],
            h.to(h_ptr.dtype.element_ty),
            mask=m_in[:, None] & r_in[None, :],
        )
    for k in range(0, K, BK):  # pass 2 (rows still in cache): quantize
        x = tl.load(x_ptr + rows * stride_xm + (k + rk)[None, :], mask=m_in[:, None], other=0.0)
        q = tl.clamp(x.to(tl.float32) / scale[:, None], -FMAX, FMAX)
        tl.store(
            q_ptr + rows * stride_qm + (k + rk)[None, :], q.to(q_ptr.dtype.element_ty), mask=m_in[:, None]
        )


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Programs of the persistent kernel: one per multiprocessor (a few under the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _unused(device: torch.device, slot: int) -> Tensor:
    """A pointer argument the kernel never reads: one per slot, so no two arguments alias (the
    Triton interpreter copies every tensor argument back after a launch)."""
    return torch.zeros(1, device=device)


def _rank_block(rc: int) -> int:
    return max(16, triton.next_power_of_2(rc)) if rc else 16


def lora_linear(
    a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    scales: tuple[Tensor, Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """y = a·weightᵀ (+ fp8 scales) + LoRA tail + bias for a 2-D ``a``; ``lora`` is
    (h, idx, rank_scale, P) as built by ``pack_ups``; ``scales`` (sa (M,), sw (N,)) for fp8."""
    fp8 = scales is not None
    M, K = a.shape
    N = weight.shape[0]
    BM, BN, BK, warps, stages, tma, tail = config(fp8)
    out = torch.empty(M, N, device=a.device, dtype=out_dtype or a.dtype)
    if lora is not None:
        h, idx, rank_scale, packed = lora
        if idx.shape[0] != triton.cdiv(N, BN):
            raise ValueError(f"packed for tile width {N // max(idx.shape[0], 1)}, kernel uses {BN}")
        rc = idx.shape[1]
    else:
        h, idx, rank_scale, packed = (_unused(a.device, k) for k in range(4))
        rc = 0
    sa, sw = scales if fp8 else (_unused(a.device, 4), _unused(a.device, 5))
    rest = (bias if bias is not None else _unused(a.device, 6), sa, sw, h, idx, rank_scale, packed)
    flags = dict(HAS_BIAS=bias is not None, FP8=fp8, HAS_LORA=lora is not None, TAIL=tail, BM=BM, BN=BN, BK=BK,
                 BR=_rank_block(rc), GROUP_M=8, num_warps=warps, num_stages=stages)  # fmt: skip
    for depth in range(stages, 0, -1):  # fewer pipeline stages where shared memory runs out
        flags["num_stages"] = depth
        try:
            _launch(a, weight, out, rest, M, N, K, rc, h, idx, packed, tma, flags)
            break
        except OutOfResources:
            if depth == 1:
                raise
    return out


def _launch(a, weight, out, rest, M, N, K, rc, h, idx, packed, tma: bool, flags: dict) -> None:
    BM, BN, BK = flags["BM"], flags["BN"], flags["BK"]
    if tma:
        sms = _sm_count(a.device)
        descs = (TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(weight, [BN, BK]),
                 TensorDescriptor.from_tensor(out, [BM, BN]))  # fmt: skip
        tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
        _lora_linear_tma_kernel[(min(sms, tiles),)](
            *descs, *rest, M, N, K, rc, h.stride(0), packed.stride(0), idx.stride(0), NUM_SMS=sms, **flags
        )
    else:
        _lora_linear_kernel[(triton.cdiv(M, BM) * triton.cdiv(N, BN),)](
            a, weight, out, *rest, M, N, K, rc,
            a.stride(0), weight.stride(0), out.stride(0), h.stride(0), packed.stride(0), idx.stride(0), **flags,
        )  # fmt: skip


def quantize_rows(x: Tensor, down_t: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x in e4m3, per-row scales (M,) float32, x·down_t or None) in one pass over 2-D ``x``."""
    M, K = x.shape
    q = torch.empty(M, K, device=x.device, dtype=E4M3)
    s = torch.empty(M, device=x.device, dtype=torch.float32)
    R = 0 if down_t is None else down_t.shape[1]
    h = None if down_t is None else torch.empty(M, R, device=x.device, dtype=x.dtype)
    BM, BK = 32, 128
    _quantize_rows_kernel[(triton.cdiv(M, BM),)](
        x, q, s, down_t if down_t is not None else _unused(x.device, 0), h if h is not None else _unused(x.device, 1),
        M, K, R, x.stride(0), q.stride(0), down_t.stride(0) if down_t is not None else 0,
        h.stride(0) if h is not None else 0,
        HAS_DOWN=down_t is not None, BM=BM, BK=BK, BR=_rank_block(R), FMAX=E4M3_MAX, num_warps=4, num_stages=2,
    )  # fmt: skip
    return q, s, h


@torch.library.custom_op("loraplug::lora_linear", mutates_args=())
def lora_linear_op(
    a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    h: Tensor | None,
    idx: Tensor | None,
    rank_scale: Tensor | None,
    packed: Tensor | None,
    a_scale: Tensor | None,
    w_scale: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    lora = None if h is None else (h, idx, rank_scale, packed)
    scales = None if a_scale is None else (a_scale, w_scale)
    return lora_linear(a, weight, bias, lora, scales, out_dtype)


@lora_linear_op.register_fake
def _(a, weight, bias, h, idx, rank_scale, packed, a_scale, w_scale, out_dtype):
    return a.new_empty(a.shape[0], weight.shape[0], dtype=out_dtype)


@torch.library.custom_op("loraplug::quantize_rows", mutates_args=())
def quantize_rows_op(x: Tensor, down_t: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    q, s, h = quantize_rows(x, down_t)
    return q, s, h if h is not None else s.new_empty(0)


@quantize_rows_op.register_fake
def _(x, down_t):
    r = 0 if down_t is None else down_t.shape[1]
    h = x.new_empty(x.shape[0], r) if r else x.new_empty(0, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty(x.shape[0], dtype=torch.float32), h
