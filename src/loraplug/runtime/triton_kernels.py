"""The Triton kernels behind ``runtime.kernels`` (imported only when they are about to run)."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs
from triton.compiler.compiler import CompiledKernel
from triton.runtime import _allocation
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from ..fp8 import cuda_capability
from .kernels import E4M3, E4M3_MAX, config, config_for, has_tma, sm_count


@triton.jit
def _tile(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (GROUP_M row tiles share their weight tiles in L2)."""
    num_m = tl.cdiv(M, BM)
    per_group = GROUP_M * tl.cdiv(N, BN)
    first_m = (tile // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _rank_scales(rs_ptr, cols, RH):
    """The scales s of h's columns ``cols`` as float32 (zero past the end)."""
    return tl.load(rs_ptr + cols, mask=cols < RH, other=0.0).to(tl.float32)


@triton.jit
def _scaled_tail(acc, h, rs, p):
    """acc + (h·s)·P: the tile's LoRA tail joins the accumulator in the same MMA."""
    return tl.dot((h.to(tl.float32) * rs[None, :]).to(p.dtype), p, acc)


@triton.jit
def _run_start(hstart_ptr, tile, SHIFT: tl.constexpr):
    """Where a tile's run of h's columns starts: (grid line, offset from it) when runs may start
    off the 16-byte grid (``hstart`` is then (tiles, 2)), else (start, 0)."""
    if SHIFT:
        line = tl.load(hstart_ptr + 2 * tile)
        offset = tl.load(hstart_ptr + 2 * tile + 1)
    else:
        line = tl.load(hstart_ptr + tile)
        offset = 0
    return line, offset


@triton.jit
def _tail_pointers(h_ptr, p_ptr, rm, rn, hcol, M, N, RH, RC, stride_hm, stride_pr, BR: tl.constexpr):
    """The tail's (BM, BR) block of h from column ``hcol`` and P's first BR rows (stored (RC, N)),
    by pointer loads (zero past either's end: any rank count, any alignment)."""
    rr = tl.arange(0, BR)
    h = tl.load(
        h_ptr + rm[:, None].to(tl.int64) * stride_hm + (hcol + rr)[None, :],
        mask=(rm < M)[:, None] & (hcol + rr < RH)[None, :],
        other=0.0,
    )
    p = tl.load(
        p_ptr + rr[:, None] * stride_pr + rn[None, :],
        mask=(rr < RC)[:, None] & (rn < N)[None, :],
        other=0.0,
    )
    return h, p


@triton.jit
def _tail_block(h_desc, p_desc, line, offset, r, pid_m, pid_n,
                BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, SHIFT: tl.constexpr):  # fmt: skip
    """The TMA kernel's tail blocks for ranks r … r + BR of the tile's run: h's (BM, BR) and P's
    (BR, BN), both moved by the tensor memory accelerator. A run starting ``offset`` columns past
    its grid line (SHIFT) is loaded 2·BR wide from the line and shifted by a product with a 0/1
    selection matrix (exact: one 1 per column)."""
    if SHIFT:
        wide = h_desc.load([pid_m * BM, line + r])
        pick = tl.arange(0, 2 * BR)[:, None] == tl.arange(0, BR)[None, :] + offset
        h = tl.dot(wide, pick.to(wide.dtype)).to(wide.dtype)
    else:
        h = h_desc.load([pid_m * BM, line + r])
    return h, p_desc.load([r, pid_n * BN])


@triton.jit
def _rescale(acc, rm, rn, M, N, sa_ptr, sw_ptr, FP8: tl.constexpr):
    """fp8 operands: the row (token) and column (weight row) scales."""
    if FP8:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        acc = acc * sa[:, None] * sw[None, :]
    return acc


@triton.jit
def _add_bias(acc, rn, N, bias_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lora_linear_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, sa_ptr, sw_ptr, h_ptr, hstart_ptr, rs_ptr, p_ptr,
    M, N, K, RH, RC,
    stride_am, stride_wn, stride_om, stride_hm, stride_pr,
    HAS_BIAS: tl.constexpr, FP8: tl.constexpr, HAS_LORA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    PACK_BN: tl.constexpr, SHIFT: tl.constexpr,
):  # fmt: skip
    """One output tile per program, pointer loads (portable Triton; also runs interpreted)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):  # K is a multiple of BK (checked by the launcher)
        a = tl.load(a_ptrs, mask=(rm < M)[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=(rn < N)[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BK
        w_ptrs += BK
    acc = _rescale(acc, rm, rn, M, N, sa_ptr, sw_ptr, FP8)
    if HAS_LORA:
        line, offset = _run_start(hstart_ptr, pid_n * BN // PACK_BN, SHIFT)
        h, p = _tail_pointers(h_ptr, p_ptr, rm, rn, line + offset, M, N, RH, RC, stride_hm, stride_pr, BR)
        acc = _scaled_tail(acc, h, _rank_scales(rs_ptr, line + offset + tl.arange(0, BR), RH), p)
    acc = _add_bias(acc, rn, N, bias_ptr, HAS_BIAS)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _descriptor(t, rows, cols, stride, B0: tl.constexpr, B1: tl.constexpr, ON_DEVICE: tl.constexpr):
    """A TMA descriptor for the 2-D tensor at ``t``: made here on the device, or ``t`` itself when
    the host made it."""
    if ON_DEVICE:
        desc = tl.make_tensor_descriptor(t, shape=[rows, cols], strides=[stride, 1], block_shape=[B0, B1])
    else:
        desc = t
    return desc


@triton.jit
def _lora_linear_tma_kernel(
    a_desc, w_desc, o_desc, h_desc, p_desc, bias_ptr, sa_ptr, sw_ptr, hstart_ptr, rs_ptr,
    M, N, K, RH, RC, stride_am, stride_wn, stride_om, stride_hm, stride_pr,
    HAS_BIAS: tl.constexpr, FP8: tl.constexpr, HAS_LORA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    PACK_BN: tl.constexpr, SHIFT: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, ONE_STEP: tl.constexpr, DEVICE_DESC: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):  # fmt: skip
    """Persistent (one program per SM), every tile moved by the tensor memory accelerator (Hopper).
    After the K loop, the tile's LoRA tail: h's run of columns from ``hstart[tile]`` and P's
    rows (contiguous by construction: ``kernels.pack_ups``; P is N-major, loaded (BR, BN) as the
    MMA's B operand), BR ranks per step, pipelined when there are
    several (ONE_STEP: a single step). FLATTEN makes the tile loop and the K loop one software
    pipeline (the next tile's loads start during this epilogue; Triton flattens only a tile loop
    with one inner loop, so with ONE_STEP). DEVICE_DESC: the descriptors are made here from plain
    pointers (the host then only passes pointers: measured far cheaper per launch than encoding
    five host descriptors). WARP_SPEC: Triton splits the tile loop into a TMA producer and MMA
    consumers. SHIFT: runs may start off the 16-byte grid (``_tail_block``)."""
    a_desc = _descriptor(a_desc, M, K, stride_am, BM, BK, DEVICE_DESC)
    w_desc = _descriptor(w_desc, N, K, stride_wn, BN, BK, DEVICE_DESC)
    o_desc = _descriptor(o_desc, M, N, stride_om, BM, BN, DEVICE_DESC)
    if HAS_LORA:
        h_desc = _descriptor(h_desc, M, RH, stride_hm, BM, BR * (1 + SHIFT), DEVICE_DESC)
        p_desc = _descriptor(p_desc, RC, N, stride_pr, BR, BN, DEVICE_DESC)
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile(tile, M, N, BM, BN, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = a_desc.load([pid_m * BM, k])
            w = w_desc.load([pid_n * BN, k])
            acc = tl.dot(a, w.T, acc)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = _rescale(acc, rm, rn, M, N, sa_ptr, sw_ptr, FP8)
        if HAS_LORA:
            line, offset = _run_start(hstart_ptr, pid_n * BN // PACK_BN, SHIFT)
            if ONE_STEP:  # one inner loop: the tile loop can still be flattened
                h, p = _tail_block(h_desc, p_desc, line, offset, 0, pid_m, pid_n, BM, BN, BR, SHIFT)
                acc = _scaled_tail(acc, h, _rank_scales(rs_ptr, line + offset + tl.arange(0, BR), RH), p)
            else:
                for r in range(0, RC, BR):
                    h, p = _tail_block(h_desc, p_desc, line, offset, r, pid_m, pid_n, BM, BN, BR, SHIFT)
                    acc = _scaled_tail(
                        acc, h, _rank_scales(rs_ptr, line + offset + r + tl.arange(0, BR), RH), p
                    )
        acc = _add_bias(acc, rn, N, bias_ptr, HAS_BIAS)
        o_desc.store([pid_m * BM, pid_n * BN], acc.to(o_desc.dtype))


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BK: tl.constexpr, FMAX: tl.constexpr):
    """One row per program, read once: its max |x|, the scale, the e4m3 values."""
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BK)
    x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FMAX
    tl.store(s_ptr + row, scale)
    q = tl.clamp(x / scale, -FMAX, FMAX)
    tl.store(q_ptr + row * stride_qm + rk, q.to(q_ptr.dtype.element_ty), mask=rk < K)


class _Binaries:
    """A jitted kernel launched through the binaries Triton compiled for it. Triton's own launch
    binds and specializes every argument again on each call (a third of the fused GEMM's host time
    per call on the H200: 63 against 40 µs, benchmarks/README.md); here the first launch of a specialization
    goes through Triton (compiling it; fewer pipeline stages where shared memory runs out) and keeps
    its binary, later launches with the same specialization call the binary's launcher directly.
    The key is at least as fine as Triton's own specialization (each tensor's dtype and 16-byte
    alignment; each integer's divisibility by 16, whether it is 1, whether it fits 32 bits), so
    the kept binary is the one Triton would pick. Launch hooks (profilers) take Triton's path."""

    def __init__(self, kernel: triton.runtime.JITFunction):
        self.kernel = kernel
        self.names = kernel.arg_names
        self.kept: dict[tuple, object] = {}

    def launch(
        self, grid: int | tuple[int, ...], args: tuple, constexprs: dict, warps: int, stages: int
    ) -> None:
        dims = (grid, 1, 1) if isinstance(grid, int) else (*grid, *(1,) * (3 - len(grid)))
        first = args[0]
        spec = _specialization(args) if isinstance(first, Tensor) and first.is_cuda else None
        key = None if spec is None else (first.device.index, spec, *constexprs.values(), warps, stages)
        binary = self.kept.get(key) if key is not None else None
        if binary is not None and not _hooked():
            stream = driver.active.get_current_stream(key[0])
            values = [constexprs[name] for name in self.names[len(args) :]]
            binary.run(
                *dims, stream, binary.function, binary.packed_metadata, None, None, None, *args, *values
            )
            return
        for depth in range(stages, 0, -1):
            try:
                binary = self.kernel[dims](*args, **constexprs, num_warps=warps, num_stages=depth)
                break
            except OutOfResources:
                if depth == 1:
                    raise
        if key is not None and isinstance(binary, CompiledKernel):
            self.kept[key] = binary


def _hooked() -> bool:
    """Whether launch hooks are installed (a profiler's): then launches take Triton's path, which
    calls them. Triton 3.6 keeps them in chains (empty: none), earlier versions as a callable or None."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _specialization(args: tuple) -> tuple | None:
    """What Triton specializes a launch on, for tensors and integers (None: another kind)."""
    spec = []
    for arg in args:
        if type(arg) is int:
            spec.append((arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31))
        elif isinstance(arg, Tensor):
            spec.append((arg.dtype, arg.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(spec)


def _has_tma(device: torch.device) -> bool:
    """The tensor memory accelerator on ``device`` (assumed under the interpreter)."""
    return device.type != "cuda" or has_tma(cuda_capability(device))


_TMA_KERNEL = _Binaries(_lora_linear_tma_kernel)
_POINTER_KERNEL = _Binaries(_lora_linear_kernel)
_QUANTIZE_KERNEL = _Binaries(_quantize_rows_kernel)


def _rank_block(rc: int, tma: bool) -> int:
    """Ranks per step of the tail: the TMA kernel loops over them 16 at a time (little shared memory
    whatever the rank); the pointer kernel takes them in one block."""
    return 16 if tma else max(16, 1 << (rc - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a constexpr function: microseconds per host call)


def lora_linear(
    a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    scales: tuple[Tensor | None, Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    down_t: Tensor | None = None,
) -> Tensor:
    """y = a·weightᵀ (+ fp8 scales) + LoRA tail + bias for a 2-D ``a``; ``lora`` is
    (h, hstart, rank_scale, P) as laid out by ``kernels.pack_ups`` at ``config(fp8).bn``, h None:
    a·``down_t`` computed here; ``scales`` (sa (M,), sw (N,)) for an fp8 weight, sa None: ``a``
    (bf16/fp16) is quantized per row here first."""
    fp8 = scales is not None
    quantize = fp8 and scales[0] is None
    if lora is not None and lora[0] is None:
        if quantize and DOWN_BESIDE_QUANTIZATION and a.is_cuda and torch.cuda.is_current_stream_capturing():
            q, sa, h = _quantize_with_down_beside(a, down_t)
            a, scales, quantize = q, (sa, scales[1]), False
        else:
            h = torch.mm(a, down_t, out=_hidden(a, down_t))
        lora = (h, *lora[1:])
    if quantize:
        q, sa = quantize_rows(a)
        a, scales = q, (sa, scales[1])
    M, K = a.shape
    N = weight.shape[0]
    pack_bn = config(fp8).bn
    tiles = config_for(fp8, M, N, sm_count(a.device))
    if tiles.tma and not _has_tma(a.device):  # before Hopper: the pointer-load kernel
        tiles = tiles._replace(tma=False)
    out = torch.empty(M, N, device=a.device, dtype=out_dtype or a.dtype)
    if lora is not None:
        h, hstart, rank_scale, packed = lora
        if hstart.shape[0] != _cdiv(N, pack_bn):
            raise ValueError(f"packed for tile width {N // max(hstart.shape[0], 1)}, kernel uses {pack_bn}")
    else:
        h = hstart = rank_scale = packed = a  # never read (HAS_LORA is off)
    # Arguments a kernel never reads point at the input ``a``: no placeholder allocations (which a
    # CUDA graph's memory pool would see outlive its capture), never the output (the Triton
    # interpreter copies every tensor argument back after a launch)
    sa, sw = scales if fp8 else (a, a)
    rc = packed.shape[0] if lora is not None else 0
    flags = dict(HAS_BIAS=bias is not None, FP8=fp8, HAS_LORA=lora is not None, BM=tiles.bm, BN=tiles.bn,
                 BK=tiles.bk, BR=_rank_block(rc, tiles.tma), GROUP_M=8, PACK_BN=pack_bn,
                 SHIFT=lora is not None and hstart.dim() == 2)  # fmt: skip
    args = (a, weight, out, bias if bias is not None else a, sa, sw, h, hstart, rank_scale, packed)
    with _on(a.device):
        if tiles.tma:
            _launch_tma(*args, rc, flags, tiles)
        else:
            _launch_pointers(*args, rc, flags, tiles)
    return out


# While a CUDA graph is captured (torch.compile's "reduce-overhead", or the user's own), the fp8
# activations' quantization and the down projection (both read x) are captured as two parallel
# branches: the graph runs them side by side. Outside a capture the extra stream synchronization
# would cost host time per layer for nothing (launches are serial there anyway).
DOWN_BESIDE_QUANTIZATION = True


def _quantize_with_down_beside(a: Tensor, down_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_rows(a)`` on the current stream and h = a·down_t on a side stream, joined before
    returning (q, scales, h)."""
    current = torch.cuda.current_stream(a.device)
    side = _side_stream(a.device)
    h = _hidden(a, down_t)  # owned by the current stream
    side.wait_stream(current)
    with torch.cuda.stream(side):
        torch.mm(a, down_t, out=h)
    q, scales = quantize_rows(a)
    current.wait_stream(side)
    return q, scales, h


def _hidden(a: Tensor, down_t: Tensor) -> Tensor:
    """An empty h = a·down_t for the kernel's tail (``_padded_rows``)."""
    return _padded_rows(a.shape[0], down_t.shape[1], a)


def _padded_rows(rows: int, cols: int, like: Tensor) -> Tensor:
    """An empty (rows, cols) view whose rows start on 16-byte boundaries, so that the tensor memory
    accelerator moves them whatever ``cols`` is (the padding lies outside the view: TMA zero-fills
    past ``cols``, never reading it)."""
    return torch.empty(rows, _cdiv(cols, 8) * 8, device=like.device, dtype=like.dtype)[:, :cols]


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (models on a second GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_tma(a, weight, out, bias, sa, sw, h, hstart, rank_scale, packed, rc, flags, tiles_cfg) -> None:
    BM, BN, BK, BR = flags["BM"], flags["BN"], flags["BK"], flags["BR"]
    M, K = a.shape
    N = weight.shape[0]
    operands = [(a, [BM, BK]), (weight, [BN, BK]), (out, [BM, BN])]
    if flags["HAS_LORA"]:
        h = _tma_rows(h)  # (P's rows are whole 16-byte units by construction: N % 8 == 0, kernels.supports)
        tail = [(h, [BM, BR * (1 + flags["SHIFT"])]), (packed, [BR, BN])]
    else:
        tail = operands[:2]  # never read
    if tiles_cfg.ws and flags["SHIFT"]:
        # the shifted tail (an MMA on a selection matrix made in registers) is not checked inside
        # warp-specialized partitions (Triton 3.6's lowering asserted on the former pointer-loaded
        # tail): such launches take the same tiles flattened
        tiles_cfg = tiles_cfg._replace(ws=False, flatten=True)
    if tiles_cfg.device_desc:
        _ensure_allocator()
        descs = [t for t, _ in operands + tail]
    else:
        descs = [TensorDescriptor.from_tensor(t, block) for t, block in operands + tail]
    sms = sm_count(a.device)
    args = (*descs, bias, sa, sw, hstart, rank_scale, M, N, K, h.shape[-1] if rc else 0, rc,
            a.stride(0), weight.stride(0), out.stride(0), h.stride(0), packed.stride(0))  # fmt: skip
    constexprs = dict(**flags, NUM_SMS=sms, FLATTEN=tiles_cfg.flatten, ONE_STEP=rc <= BR, DEVICE_DESC=tiles_cfg.device_desc, WARP_SPEC=tiles_cfg.ws)  # fmt: skip
    _TMA_KERNEL.launch(
        min(sms, _cdiv(M, BM) * _cdiv(N, BN)), args, constexprs, tiles_cfg.warps, tiles_cfg.stages
    )


def _tma_rows(t: Tensor) -> Tensor:
    """``t`` with rows the tensor memory accelerator can move (16-byte aligned, 16-byte strides):
    itself, or a ``_padded_rows`` copy (an h a caller computed unpadded)."""
    if (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    return _padded_rows(*t.shape, t).copy_(t)


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Global memory Triton asks for at launch (where kernels write their TMA descriptors)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Device-made descriptors need a scratch allocator: ours, unless one is set already. Triton
    keeps it in a context variable (per thread): checked at every launch, so a worker thread (as
    in ComfyUI) gets one too."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _launch_pointers(
    a, weight, out, bias, sa, sw, h, hstart, rank_scale, packed, rc, flags, tiles_cfg
) -> None:
    M, K = a.shape
    N = weight.shape[0]
    args = (a, weight, out, bias, sa, sw, h, hstart, rank_scale, packed, M, N, K, h.shape[-1] if rc else 0, rc,
            a.stride(0), weight.stride(0), out.stride(0), h.stride(0), packed.stride(0))  # fmt: skip
    grid = _cdiv(M, flags["BM"]) * _cdiv(N, flags["BN"])
    _POINTER_KERNEL.launch(grid, args, flags, tiles_cfg.warps, tiles_cfg.stages)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x in e4m3, per-row scales (M,) float32) of a 2-D ``x``, one pass over it."""
    M, K = x.shape
    q = torch.empty(M, K, device=x.device, dtype=E4M3)
    s = torch.empty(M, device=x.device, dtype=torch.float32)
    block = 1 << (K - 1).bit_length()
    with _on(x.device):
        _QUANTIZE_KERNEL.launch(M, (x, q, s, K, x.stride(0), q.stride(0)), dict(BK=block, FMAX=E4M3_MAX),
                                min(16, max(4, block // 1024)), 3)  # fmt: skip
    return q, s


# The fused GEMM (with an fp8 weight's activation quantization) as one operator for compiled
# graphs, registered with ``torch.library.Library`` rather than ``torch.library.custom_op``: the
# latter's Python wrappers (autograd and aliasing checks on every call) cost 60 µs per call on the
# H200's host, as much as the launch itself (benchmarks/README.md). It has no backward: training
# takes the portable path.
_LIB = torch.library.Library("loraplug", "DEF")
_LIB.define(
    "lora_linear(Tensor a, Tensor weight, Tensor? bias, Tensor? h, Tensor? down_t, Tensor? hstart, Tensor? rank_scale, "
    "Tensor? packed, Tensor? a_scale, Tensor? w_scale, ScalarType out_dtype) -> Tensor"
)


def lora_linear_flat(a, weight, bias, h, down_t, hstart, rank_scale, packed, a_scale, w_scale, out_dtype):
    """``lora_linear`` given the operator's flat arguments (the eager path calls it too)."""
    lora = None if hstart is None else (h, hstart, rank_scale, packed)
    scales = None if w_scale is None else (a_scale, w_scale)
    return lora_linear(a, weight, bias, lora, scales, out_dtype, down_t)


@torch.library.register_fake("loraplug::lora_linear", lib=_LIB)
def _(a, weight, bias, h, down_t, hstart, rank_scale, packed, a_scale, w_scale, out_dtype):
    return a.new_empty(a.shape[0], weight.shape[0], dtype=out_dtype)


_LIB.impl("lora_linear", lora_linear_flat, "CompositeExplicitAutograd")
