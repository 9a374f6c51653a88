"""The fused fast path's CPU-checkable parts: the packed up projections, the dispatch (a forward
override that falls back to the portable path wherever the kernels do not apply), the fp8 base layer,
and — where Triton is installed — the kernels themselves under Triton's CPU interpreter."""

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_identical, compiled_graphs, interpreted, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loraplug as lp
from loraplug.fp8 import Fp8Linear, fp8_linear_reference
from loraplug.runtime import kernels
from loraplug.runtime.bypass import runners


@pytest.mark.parametrize("bn", [16, 32, 64])
def test_packed_ups_reproduce_every_slice(bn):
    g = torch.Generator().manual_seed(bn)
    n = 150
    spans = [(0, 4, 0, 50), (4, 3, 50, 37), (7, 5, 87, 63), (12, 2, 0, 150), (14, 6, 40, 20)]
    ups = [torch.randn(r, size, generator=g) for _, r, _, size in spans]
    h = torch.randn(9, 20, generator=g)
    want = torch.zeros(9, n)
    for (start, r, off, size), up in zip(spans, ups, strict=True):
        want[:, off : off + size] += h[:, start : start + r] @ up
    packing = kernels.pack_ups(spans, ups, n, bn)
    packed, rc = packing.packed, packing.packed.shape[0]  # stored N-major: (RC, N)
    columns = packing.columns if packing.columns is not None else list(range(20))
    h_laid = h[:, columns]
    h_laid = torch.cat([h_laid, torch.randn(9, rc, generator=g)], 1)  # past the end: any value
    got = torch.zeros(9, n)
    for t, start in enumerate(_run_starts(packing)):
        cols = slice(t * bn, min((t + 1) * bn, n))
        got[:, cols] = h_laid[:, start : start + rc] @ packed[:, cols]  # one contiguous run per tile
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    most = max(
        sum(r for _, r, off, size in spans if off < min((t + 1) * bn, n) and off + size > t * bn)
        for t in range(packing.hstart.shape[0])
    )
    assert rc == most  # no padding: the most ranks any tile reads


def _run_starts(packing: kernels.Packing) -> list[int]:
    """Each tile's run start, checking ``hstart``'s two forms: the starts themselves where all sit on
    the 16-byte grid (multiples of 8 columns), else (grid line, offset) pairs."""
    if packing.hstart.dim() == 1:
        assert not (packing.hstart % 8).any()
        return packing.hstart.tolist()
    lines, offsets = packing.hstart.unbind(1)
    assert not (lines % 8).any() and ((offsets >= 0) & (offsets < 8)).all() and offsets.any()
    return (lines + offsets).tolist()


@st.composite
def _layouts(draw):
    """Entries (rank start, rank, offset, size) on an output of n columns, sorted by offset as the
    runtime stacks them, and a tile width."""
    n = draw(st.integers(1, 200))
    entries = []
    for _ in range(draw(st.integers(1, 6))):
        off = draw(st.integers(0, n - 1))
        entries.append((draw(st.integers(1, 20)), off, draw(st.integers(1, n - off))))
    entries.sort(key=lambda e: e[1])
    starts = [sum(r for r, _, _ in entries[:i]) for i in range(len(entries))]
    spans = [(st_, r, off, size) for st_, (r, off, size) in zip(starts, entries, strict=True)]
    return spans, n, draw(st.sampled_from([16, 32, 64]))


@given(_layouts(), st.integers(0, 2**31 - 1))
def test_packing_runs_are_contiguous_aligned_and_exact(layout, seed):
    """For any slices, ranks and tile width: each tile reads one run of h's columns, P's rows
    beyond a tile's ranks are zero, every column lists a real rank, the stacked order is kept
    unless some column must repeat, and tile by tile the run times P is the sum of the adapters
    covering it."""
    spans, n, bn = layout
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(r, size, generator=g, dtype=torch.float64) for _, r, _, size in spans]
    total = sum(r for _, r, _, _ in spans)
    h = torch.randn(5, total, generator=g, dtype=torch.float64)
    packing = kernels.pack_ups(spans, ups, n, bn)
    columns = packing.columns if packing.columns is not None else list(range(total))
    assert set(columns) == set(range(total))
    assert packing.columns is None or len(packing.columns) > total  # copied only to repeat
    laid = h[:, columns]
    rc = packing.packed.shape[0]
    assert packing.packed.shape[1] == n  # N-major
    laid = torch.cat([laid, torch.full((5, rc), float("nan"), dtype=h.dtype)], 1)  # never multiplied
    starts = _run_starts(packing)
    assert len(starts) == -(-n // bn)
    for t, start in enumerate(starts):
        cols = slice(t * bn, min((t + 1) * bn, n))
        want = torch.zeros(5, cols.stop - cols.start, dtype=h.dtype)
        for (s0, r, off, size), up in zip(spans, ups, strict=True):
            lo, hi = max(off, cols.start), min(off + size, cols.stop)
            if lo < hi:
                want[:, lo - cols.start : hi - cols.start] += h[:, s0 : s0 + r] @ up[:, lo - off : hi - off]
        block = packing.packed[:, cols]
        used = block.abs().sum(1) > 0
        run = laid[:, start : start + rc][:, used]
        assert not run.isnan().any()  # the rows P uses never reach past h
        torch.testing.assert_close(run @ block[used], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "spans, columns",
    [
        ([(0, 8, 0, 64), (8, 8, 64, 64), (16, 8, 128, 64)], None),  # q, k, v on tile boundaries
        ([(0, 8, 0, 64), (8, 8, 0, 64), (16, 8, 64, 64), (24, 8, 64, 64)], None),  # two LoRAs, sorted
        ([(0, 8, 0, 40), (8, 8, 40, 88)], None),  # a tile straddles both slices: still one run each
        ([(0, 4, 0, 64)], None),  # rank 4: no padding
        ([(0, 4, 0, 64), (4, 12, 0, 64), (16, 3, 64, 64)], None),
        (
            [(0, 8, 0, 128), (8, 8, 0, 64), (16, 8, 64, 64)],
            list(range(16)) + list(range(8)) + list(range(16, 24)),
        ),
    ],
)
def test_packing_keeps_the_stacked_order_where_it_can(spans, columns):
    """No copy of the down projections in the common layouts; a whole-output adapter beside slice
    adapters is the case that repeats columns."""
    ups = [torch.randn(r, size) for _, r, _, size in spans]
    n = max(off + size for _, _, off, size in spans)
    assert kernels.pack_ups(spans, ups, n, 32).columns == columns


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))


def _lora(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "0.lora_A.weight": torch.randn(4, 32, generator=g),
        "0.lora_B.weight": torch.randn(48, 4, generator=g),
        "2.lora_A.weight": torch.randn(2, 48, generator=g),
        "2.lora_B.weight": torch.randn(16, 2, generator=g),
    }


def test_dispatch_takes_the_forward_and_falls_back_on_cpu(monkeypatch):
    """Where kernels are available the runner owns forward; on CPU tensors it must give exactly the
    hook path's output, follow strength changes and masks, train, and leave nothing on removal."""
    x = torch.randn(5, 32)
    model = _model()
    monkeypatch.setenv("LORAPLUG_ACCUMULATE", "0")
    hooked = lp.apply(model, [_lora(0), _lora(1)], strength=[0.6, 1.4])
    want = model(x)
    assert "forward" not in model[0].__dict__ and runners(model[0])._hook is not None
    hooked.remove()
    monkeypatch.setattr(kernels, "available", lambda: True)
    hooked = lp.apply(model, _lora(0))  # available, but a float base does not take the kernel by default
    assert not runners(model[0]).fused and "forward" not in model[0].__dict__
    hooked.remove()
    monkeypatch.delenv("LORAPLUG_ACCUMULATE")
    monkeypatch.setenv("LORAPLUG_KERNELS", "all")  # float bases take the kernel only when opted in
    snap = snapshot(model)
    handle = lp.apply(model, [_lora(0), _lora(1)], strength=[0.6, 1.4])
    assert runners(model[0]).fused and "forward" in model[0].__dict__
    assert not model[0]._forward_hooks
    assert runners(model[0])._fused_output(model[0], x) is None  # CPU: not applicable
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)  # the accumulating base GEMM
    handle.set_strength([0.0, 0.0])
    torch.testing.assert_close(model(x), _model()(x))
    handle.set_strength([0.6, 1.4])
    handle.set_mask([torch.zeros(1, 5), None], tokens=True)
    masked = model(x[None])[0]
    handle.set_mask(None)
    second = _model()
    lp.apply(second, _lora(1), strength=1.4)
    torch.testing.assert_close(masked, second(x[None])[0], rtol=1e-5, atol=1e-5)
    handle.remove()
    assert "forward" not in model[0].__dict__ and runners(model[0]) is None
    assert_identical(model, snap)


def test_dispatch_trains_through_the_portable_path(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setenv("LORAPLUG_KERNELS", "all")
    model = _model().requires_grad_(False)
    handle = lp.create(model, "lora", rank=2, targets=r"^\d$")
    assert runners(model[0]).fused
    x = torch.randn(8, 32)
    target = torch.randn(8, 16)
    result = lp.train(
        handle, [(x, target)], lambda b: ((model(b[0]) - b[1]) ** 2).mean(), steps=3, lr=1e-2, progress=False
    )
    assert result.losses[-1] < result.losses[0]
    handle.remove()
    assert "forward" not in model[0].__dict__


def test_fp8_linear_is_the_reference_arithmetic_and_merges_per_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40))
    x = torch.randn(6, 64)
    dense = model(x)
    assert lp.quantize_fp8(model) == 1
    layer = model[0]
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.shape == (40,)
    base = layer(x)
    torch.testing.assert_close(base, fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias))
    assert ((base - dense).norm() / dense.norm()) < 0.08  # e4m3 on both operands
    sd = {"0.lora_A.weight": torch.randn(4, 64), "0.lora_B.weight": torch.randn(40, 4)}
    delta = (x @ sd["0.lora_A.weight"].T) @ sd["0.lora_B.weight"].T
    snap = snapshot(model)
    handle = lp.apply(model, sd)
    torch.testing.assert_close(model(x), base + delta, rtol=1e-5, atol=1e-4)
    assert not handle.report.dequantized  # a plain LoRA never reads the fp8 weight
    handle.remove()
    assert_identical(model, snap)
    weight = layer.weight
    merged = lp.merge(model, sd)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert ((model(x) - (base + delta)).norm() / (base + delta).norm()) < 0.08
    merged.remove()
    assert layer.weight is weight
    assert_identical(model, snap)


def test_quantize_fp8_selects_by_pattern_and_refuses_meta():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    assert lp.quantize_fp8(model, targets=r"^1$") == 1
    assert type(model[0]) is nn.Linear and isinstance(model[1], Fp8Linear)
    mixed = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, device="meta"))
    with pytest.raises(lp.LoraplugError, match="^1: .*meta"):
        lp.quantize_fp8(mixed)
    assert all(type(m) is nn.Linear for m in mixed)  # nothing swapped: all-or-nothing
    with pytest.raises(lp.LoraplugError, match="not a regular expression"):
        lp.quantize_fp8(model, targets="(")
    assert type(model[0]) is nn.Linear


INTERPRETED = """
import torch
from loraplug.runtime import kernels
kernels.CONFIGS.update(bf16=(32, 32, 32, 4, 1, TMA, FLAT, True, WS), fp8=(32, 32, 32, 4, 1, TMA, FLAT, True, WS))
from loraplug.runtime import triton_kernels as tk
torch.manual_seed(0)
M, K, N = 70, 128, 96
x = torch.randn(M, K, dtype=torch.float16)
w = torch.randn(N, K, dtype=torch.float16) * 0.1
b = torch.randn(N, dtype=torch.float16)
spans = [(0, 4, 0, 32), (4, 4, 32, 40), (8, 3, 72, 24), (11, 5, 0, 96)]
ups = [torch.randn(r, s, dtype=torch.float16) for _, r, _, s in spans]
down = torch.randn(K, 16, dtype=torch.float16) * 0.1
rs = torch.rand(16, dtype=torch.float16)
packing = kernels.pack_ups(spans, ups, N, 32)
assert packing.columns is not None  # the whole-output adapter repeats next to each slice
cols = torch.tensor(packing.columns)
laid = lambda t: t[:, cols].contiguous()
hstart, packed = packing.hstart, packing.packed
h = x @ down
ref = x.float() @ w.float().T + b.float()
for (st, r, off, s), u in zip(spans, ups):
    ref[:, off:off + s] += (h.float()[:, st:st + r] * rs.float()[st:st + r]) @ u.float()
y = tk.lora_linear(x, w, b, (laid(h), hstart, laid(rs[None])[0], packed))
assert ((y.float() - ref).norm() / ref.norm()) < 1e-3, "bf16/fp16 kernel"
q, s = tk.quantize_rows(x)
from loraplug.fp8 import quantize_per_row
q_ref, s_ref = quantize_per_row(x)
torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)  # the same scale as the reference quantizer
assert ((q.float() * s[:, None] - x.float()).norm() / x.float().norm()) < 0.06, "row quantization"
wq, ws = quantize_per_row(w)
y8 = tk.lora_linear(q, wq, b, (laid(h), hstart, laid(rs[None])[0], packed), (s, ws), torch.float16)
# the interpreter rounds to fp8 its own way: check the GEMM on the kernel's own quantized x
ref8 = (q.float() * s[:, None]) @ (wq.float() * ws[:, None]).T + b.float()
for (st, r, off, sz), u in zip(spans, ups):
    ref8[:, off:off + sz] += (h.float()[:, st:st + r] * rs.float()[st:st + r]) @ u.float()
assert ((y8.float() - ref8).norm() / ref8.norm()) < 2e-3, "fp8 kernel"
# given float activations and no activation scales, the fp8 GEMM quantizes them itself (same pass)
lora = (laid(h), hstart, laid(rs[None])[0], packed)
assert torch.equal(tk.lora_linear(x, wq, b, lora, (None, ws), torch.float16), y8)
# h computed in the call from the down projections (laid out like h): a GEMM before the kernel
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
laid_down, lora_d = laid(down), (None, hstart, laid(rs[None])[0], packed)
assert rel(tk.lora_linear(x, w, b, lora_d, None, None, laid_down), y) < 1e-3
y8d = tk.lora_linear(x, wq, b, lora_d, (None, ws), torch.float16, laid_down)
assert rel(y8d, y8) < 2e-3, "fp8 kernel, h computed in the call"
# the registered operator (what compiled graphs call) runs the same launches
ops = kernels.ops()
assert torch.equal(ops.lora_linear(x, w, b, lora[0], None, *lora[1:], None, None, torch.float16), y)
assert torch.equal(ops.lora_linear(x, wq, b, None, laid_down, *lora[1:], None, ws, torch.float16), y8d)
# ranks that are not multiples of 8, no padding (h given unpadded: the call pads a copy): runs
# from column 0 (two rank-4 LoRAs on the whole output; one rank 4), runs from columns 4 and 12
# (ranks 4, 8, 4 on three slices: h loaded from the grid line and shifted), and a shifted run of
# 20 ranks (two steps of the tail)
cases = [([(0, 4, 0, 96), (4, 4, 0, 96)], False), ([(0, 4, 0, 96)], False),
         ([(0, 4, 0, 32), (4, 8, 32, 32), (12, 4, 64, 32)], True),
         ([(0, 4, 0, 32), (4, 20, 32, 32), (24, 4, 64, 32)], True)]
down2, rs2 = torch.randn(K, 32, dtype=torch.float16) * 0.1, torch.rand(32, dtype=torch.float16)
for spans2, shifted in cases:
    ups2 = [torch.randn(r, sz, dtype=torch.float16) for _, r, _, sz in spans2]
    rh = sum(r for _, r, _, _ in spans2)
    p2 = kernels.pack_ups(spans2, ups2, N, 32)
    h2 = x @ down2[:, :rh]
    assert p2.columns is None and (p2.hstart.dim() == 2) == shifted
    ref2 = x.float() @ w.float().T + b.float()
    for (st, r, off, sz), u in zip(spans2, ups2):
        ref2[:, off:off + sz] += (h2.float()[:, st:st + r] * rs2.float()[st:st + r]) @ u.float()
    lora2 = (h2, p2.hstart, rs2[:rh].contiguous(), p2.packed)
    assert rel(tk.lora_linear(x, w, b, lora2), ref2) < 1e-3, spans2
    assert rel(tk.lora_linear(x, w, b, (None, *lora2[1:]), None, None, down2[:, :rh]), ref2) < 1e-3, spans2
# few output tiles (fewer than two per program slot): half-width tiles over the same packing
kernels.CONFIGS.update(bf16_narrow=(32, 16, 32, 4, 1, TMA, FLAT, True, WS), fp8_narrow=(32, 16, 32, 4, 1, TMA, FLAT, True, WS))
assert kernels.config_for(False, 40, N, 4).bn == 16 and kernels.config_for(False, M, N, 4).bn == 32
assert rel(tk.lora_linear(x[:40], w, b, (laid(h)[:40], *lora[1:])), ref[:40]) < 1e-3, "narrow tiles"
assert rel(tk.lora_linear(q[:40], wq, b, (laid(h)[:40], *lora[1:]), (s[:40], ws), torch.float16), ref8[:40]) < 2e-3
print("ok")
"""


@interpreted
@pytest.mark.parametrize(
    "tma, flat, ws",
    [(False, True, False), (True, True, False), (True, False, False), (True, False, True)],
)
def test_kernels_under_the_triton_interpreter(tma, flat, ws):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            INTERPRETED.replace("TMA", str(tma)).replace("FLAT", str(flat)).replace("WS", str(ws)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_training_through_a_frozen_fp8_base():
    """Gradients reach adapters before an Fp8Linear: dL/dx = dL/dy · W (dequantized), and a LoRA
    on an earlier layer of an fp8 model trains."""
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(32, 24))
    x = torch.randn(5, 32, requires_grad=True)
    grad = torch.randn(5, 24)
    layer(x).backward(grad)
    torch.testing.assert_close(x.grad, grad @ layer.dequantized(), rtol=1e-5, atol=1e-5)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24)).requires_grad_(False)
    lp.quantize_fp8(model)
    handle = lp.create(model, "lora", rank=4, targets=r"^0$")
    batch = (torch.randn(64, 16), torch.randn(64, 24))
    result = lp.train(
        handle, [batch], lambda b: ((model(b[0]) - b[1]) ** 2).mean(), steps=30, lr=3e-2, progress=False
    )
    assert result.losses[-1] < 0.9 * result.losses[0]
    handle.remove()


@pytest.mark.parametrize(
    "spans, views",
    [
        ([(0, 4, 0, 64), (4, 4, 64, 64), (8, 4, 128, 64)], True),  # q, k, v on tile boundaries
        ([(0, 4, 0, 64), (4, 2, 0, 64), (6, 4, 64, 64), (10, 2, 64, 64)], True),  # two LoRAs on q, k
        ([(0, 4, 0, 64), (4, 2, 0, 128), (6, 4, 64, 64)], False),  # a whole-output one moves
        ([(0, 4, 0, 40), (4, 4, 40, 88)], False),  # a tile holds both slices: rows shift
    ],
)
def test_up_views_share_the_packing(spans, views):
    g = torch.Generator().manual_seed(len(spans))
    n = max(off + size for _, _, off, size in spans)
    ups = [torch.randn(r, size, generator=g) for _, r, _, size in spans]
    packing = kernels.pack_ups(spans, ups, n, 32)
    packed = packing.packed
    got = kernels.up_views(spans, packing)
    assert (got is not None) == views
    if got is not None:
        for view, up in zip(got, ups, strict=True):
            assert (
                torch.equal(view, up)
                and view.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
            )


RUNNER_INTERPRETED = """
import torch
from torch import nn
from loraplug.runtime import kernels
kernels.CONFIGS.update(bf16=(32, 32, 32, 4, 1, True, True), fp8=(32, 32, 32, 4, 1, True, True))
import loraplug as lp
from loraplug import arch
from loraplug.runtime.bypass import runners

arch.PROVIDERS.append(lambda model, ops: ({"q": [arch.Target("layer", 0, 32)], "kv": [arch.Target("layer", 32, 64)]}
                                          if hasattr(model, "layer") else {}, set()))
torch.manual_seed(0)
holder = nn.Module()
holder.layer = nn.Linear(64, 96).half()
g = torch.Generator().manual_seed(1)
def lora(rank):
    sd = {"q.lora_A.weight": torch.randn(rank, 64, generator=g), "q.lora_B.weight": torch.randn(32, rank, generator=g),
          "kv.lora_A.weight": torch.randn(rank, 64, generator=g), "kv.lora_B.weight": torch.randn(64, rank, generator=g)}
    return {k: v.half() * 0.1 for k, v in sd.items()}
sds = [lora(8), lora(4)]  # 12 ranks a slice: kv's run starts at column 12 (shifted), nothing padded
handle = lp.apply(holder, sds, strength=[0.7, 1.3])
assert handle.report.ok, handle.report.unmatched
layer, runner = holder.layer, runners(holder.layer)
x = torch.randn(50, 64).half()
def reference(strengths):
    ref = x.float() @ layer.weight.float().T + layer.bias.float()
    for sd, st in zip(sds, strengths):
        for name, (off, size) in {"q": (0, 32), "kv": (32, 64)}.items():
            ref[:, off:off + size] += st * (x.float() @ sd[name + ".lora_A.weight"].float().T) @ sd[name + ".lora_B.weight"].float().T
    return ref
for strengths in ([0.7, 1.3], [0.0, 2.0]):
    handle.set_strength(strengths)
    fused = runner._fused(layer, x, runner._lowrank_for(x)).float()
    ref = reference(strengths)
    assert ((fused - ref).norm() / ref.norm()) < 2e-3, ((fused - ref).norm() / ref.norm()).item()
group = next(iter(runner._lowrank.values()))
assert group.packs[32].columns is None and group.packs[32].packed.shape == (12, 96)
assert group.packs[32].hstart.tolist() == [[0, 0], [8, 4], [8, 4]]
assert group.packs[32].down_t is group.down_t
assert all(u.untyped_storage().data_ptr() == group.packs[32].packed.untyped_storage().data_ptr() for u in group.ups_t)
portable = runner._run(layer, (x,), {}, type(layer).forward(layer, x)).float()  # reads those views
assert ((portable - ref).norm() / ref.norm()) < 2e-3
handle.remove()
print("ok")
"""


@interpreted
def test_runner_fused_path_under_the_triton_interpreter():
    """The runner's fused call (packing, up views, kernel arguments) on a float base. (The fp8 path
    runs on the GPU tests: the interpreter corrupts memory storing fp8.)"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER_INTERPRETED], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_kernel_availability_is_not_looked_up_per_call(monkeypatch):
    """Whether Triton is installed is read once: ``importlib.util.find_spec`` inside a compiled
    graph broke it at every fp8 layer (torch 2.11 skips that function)."""
    import importlib.util

    find_spec = importlib.util.find_spec

    def lookup(name, *args, **kwargs):
        assert name != "triton", "Triton looked up per call"
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", lookup)
    torch._dynamo.reset()
    checked = torch.compile(
        lambda x: x + kernels.available() + kernels.here((9, 0)), backend="eager", fullgraph=True
    )
    checked(torch.zeros(2))  # Dynamo ignores functools.cache: a cached lookup would be traced
    torch._dynamo.reset()


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H100 PCIe"])
def test_kernel_switches(monkeypatch, gpu):
    """LORAPLUG_KERNELS: unset → fused on fp8 bases, and on float bases where that was measured
    faster (an H100 SXM, the card measured: on the shapes float_shape_fuses picks); shapes → float bases on any GPU;
    fp8 → fp8 bases only; all → float bases on every shape; base → adapters never fused; 0 → no
    kernels."""
    monkeypatch.setattr(kernels, "TRITON_INSTALLED", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    from loraplug.runtime.bypass import _float_shapes, _fusable

    measured = gpu == "NVIDIA H100 80GB HBM3"
    fp8 = Fp8Linear(8, 8)
    for env, shapes, float_base, fp8_base in (
        ("", measured, measured, True),
        ("shapes", True, True, True),
        ("fp8", False, False, True),
        ("all", False, True, True),
        ("base", False, False, False),
        ("0", False, False, False),
    ):
        monkeypatch.setenv("LORAPLUG_KERNELS", env)
        linear = nn.Linear(8, 8)
        assert _float_shapes(linear) == shapes, env
        got = (_fusable(linear, _float_shapes(linear)), _fusable(fp8, _float_shapes(fp8)))
        assert got == (float_base, fp8_base), env
    monkeypatch.delenv("LORAPLUG_KERNELS")
    assert kernels.on_float_shapes(torch.device("cuda", 0)) == measured
    assert not kernels.on_float_shapes(torch.device("cpu"))


def test_compiled_graphs_fuse_adapters_on_hopper_and_later(monkeypatch):
    """Compiled graphs call the fused operator where it was measured (TMA, sm_90+), for fp8 layers
    without adapters too (``here``; eager mode always); before Hopper only when asked; the
    capability lookup is not a cached function inside a graph."""
    monkeypatch.delenv("LORAPLUG_KERNELS", raising=False)
    capabilities = ((8, 0), (8, 9), (9, 0), (10, 0))
    assert [kernels.fuses_in_graphs(c) for c in capabilities] == [False, False, True, True]
    assert all(kernels.here(c) for c in capabilities)  # eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert [kernels.here(c) for c in capabilities] == [False, False, True, True]
    monkeypatch.setenv("LORAPLUG_KERNELS", "all")
    assert kernels.fuses_in_graphs((8, 9)) and kernels.here((8, 9))
    monkeypatch.undo()
    from loraplug.fp8 import cuda_capability

    got = torch.compile(lambda x: x + 1 if cuda_capability(x.device) > (0, 0) else x, fullgraph=True)
    assert torch.equal(got(torch.zeros(2)), torch.zeros(2))  # a CPU tensor: (0, 0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_scratch_allocator_in_every_thread():
    """Triton's allocator lives in a context variable: a worker thread (ComfyUI runs prompts in
    one) starts without it, and the launcher must set it there too."""
    import threading

    from triton.runtime import _allocation

    from loraplug.runtime import triton_kernels as tk

    seen = {}

    def worker():
        seen["before"] = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        tk._ensure_allocator()
        seen["after"] = _allocation._allocator.get()

    tk._ensure_allocator()
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"before": True, "after": tk._scratch}


def test_kernel_shapes():
    """The kernels take reductions in whole 128-steps and outputs in whole 16-byte rows; anything
    else (an odd width, say) keeps the portable path instead of misaligned TMA tiles."""
    assert kernels.supports(3072, 9216) and kernels.supports(128, 8)
    assert not kernels.supports(3000, 9216) and not kernels.supports(3072, 9217)


def _fp8_model_with_lora(monkeypatch):
    """Two Fp8Linear layers, a LoRA on the first, as if on an fp8-capable GPU with Triton (CPU
    ``torch._scaled_mm`` stands in for the GPU's)."""
    from loraplug import fp8 as fp8_module

    monkeypatch.setattr(fp8_module, "fp8_matmul_on", lambda device: True)
    monkeypatch.setattr(kernels, "available", lambda: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128))
    lp.quantize_fp8(model)
    sd = {"0.lora_A.weight": torch.randn(4, 128), "0.lora_B.weight": torch.randn(128, 4) * 0.1}
    return model, sd, lp.apply(model, sd)


def test_compiled_graphs_call_scaled_mm_not_the_custom_ops(monkeypatch):
    """Inside torch.compile an fp8 layer without adapters runs ``torch._scaled_mm`` (Inductor
    fuses its quantization); off CUDA the layer with a LoRA does too, the LoRA on the portable
    path (on CUDA it takes the fused operator: tests/gpu/test_fused.py), equal to the reference
    arithmetic."""
    model, sd, handle = _fp8_model_with_lora(monkeypatch)
    x = torch.randn(6, 128)
    with torch.no_grad():
        h = fp8_linear_reference(x, model[0].weight, model[0].weight_scale, model[0].bias)
        h = h + (x @ sd["0.lora_A.weight"].T) @ sd["0.lora_B.weight"].T
        want = fp8_linear_reference(
            torch.nn.functional.gelu(h), model[2].weight, model[2].weight_scale, model[2].bias
        )
    with torch.no_grad():
        got, graphs = compiled_graphs(model, lambda m: m(x))
    handle.remove()
    assert len(graphs) == 1 and "_scaled_mm" in graphs[0] and "loraplug" not in graphs[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_compiled_graphs_hold_the_custom_ops_when_asked(monkeypatch):
    """LORAPLUG_KERNELS=all puts the Triton kernels into compiled graphs: one operator per fp8
    layer, the activations' quantization inside it."""
    model, _, handle = _fp8_model_with_lora(monkeypatch)
    monkeypatch.setenv("LORAPLUG_KERNELS", "all")
    graphs = []

    def stop(gm, example_inputs):
        graphs.append(str(gm.graph))
        raise RuntimeError("recorded")

    with torch.no_grad(), pytest.raises(Exception, match="recorded"):
        torch.compile(model, backend=stop)(torch.randn(6, 128))
    torch._dynamo.reset()
    handle.remove()
    assert graphs[-1].count("loraplug.lora_linear") == 2 and "quantize" not in graphs[-1]


def test_stacked_adapters_on_one_slice_add_with_one_gemm():
    """Adapters stacked on the same output slice form one run: one addmm_ (one read-modify-write of
    the slice) for all of them, exact against adding them one by one; a single adapter keeps its
    own up projection (no copy)."""
    model = _model()
    x = torch.randn(5, 32)
    first, second = _lora(0), _lora(1)
    with torch.no_grad():
        want = model[0](x) + 0.5 * (x @ first["0.lora_A.weight"].T) @ first["0.lora_B.weight"].T
        want = want + 1.5 * (x @ second["0.lora_A.weight"].T) @ second["0.lora_B.weight"].T
    handle = lp.apply(model, [first, second], strength=[0.5, 1.5])
    with torch.no_grad():
        got = model[0](x)
    group = next(iter(runners(model[0])._lowrank.values()))
    assert group.runs == [(0, 8, 0, 48)] and group.run_ups()[0].shape == (8, 48)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    handle.remove()
    single = lp.apply(model, first)
    with torch.no_grad():
        model[0](x)
    group = next(iter(runners(model[0])._lowrank.values()))
    assert group.run_ups()[0] is group.ups_t[0]
    single.remove()


def test_adapters_on_one_slice_are_neighbours_whatever_the_order(monkeypatch):
    """Entries sort by output slice (offset, size), so two LoRAs on q stay one run even when a
    whole-output adapter came between them; the sum is unchanged."""
    from loraplug import arch

    monkeypatch.setattr(arch, "PROVIDERS", [*arch.PROVIDERS, lambda model, ops: (
        {"q": [arch.Target("layer", 0, 32)]} if hasattr(model, "layer") else {}, set())])  # fmt: skip
    torch.manual_seed(0)
    holder = nn.Module()
    holder.layer = nn.Linear(16, 96)
    g = torch.Generator().manual_seed(2)
    q1, q2 = ({"q.lora_A.weight": torch.randn(4, 16, generator=g), "q.lora_B.weight": torch.randn(32, 4, generator=g)}
              for _ in range(2))  # fmt: skip
    whole = {"layer.lora_A.weight": torch.randn(2, 16, generator=g), "layer.lora_B.weight": torch.randn(96, 2, generator=g)}  # fmt: skip
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = holder.layer(x)
        want[:, :32] += (x @ q1["q.lora_A.weight"].T) @ q1["q.lora_B.weight"].T
        want[:, :32] += (x @ q2["q.lora_A.weight"].T) @ q2["q.lora_B.weight"].T
        want += (x @ whole["layer.lora_A.weight"].T) @ whole["layer.lora_B.weight"].T
        handle = lp.apply(holder, [{**q1, **whole}, q2])
        got = holder.layer(x)
    group = next(iter(runners(holder.layer)._lowrank.values()))
    assert group.runs == [(0, 8, 0, 32), (8, 2, 0, 96)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    handle.remove()


def test_grouped_runtime_adds_no_copy_of_a_single_adapter():
    """One LoRA per module: the runtime reads the adapter's own tensors (transposed views), so
    bypass adds no adapter-sized memory; several entries share one stacked copy of their downs."""
    model = _model()
    adapters = lp.load({k: v.clone() for k, v in _lora(0).items()})
    handle = lp.apply(model, adapters)
    group = next(iter(runners(model[0])._lowrank.values()))
    own = {t.untyped_storage().data_ptr() for a in adapters.adapters.values() for t in a.tensors.values()}
    assert group.down_t.untyped_storage().data_ptr() in own
    assert all(u.untyped_storage().data_ptr() in own for u in group.ups_t)
    handle.remove()
    two = lp.apply(model, [_lora(0), _lora(1)])
    group = next(iter(runners(model[0])._lowrank.values()))
    assert group.down_t.shape == (32, 8) and all(
        u.untyped_storage().data_ptr()
        in {
            t.untyped_storage().data_ptr()
            for s in two.adapters
            for a in s.adapters.values()
            for t in a.tensors.values()
        }
        for u in group.ups_t
    )
    two.remove()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_kept_binaries_are_keyed_at_least_as_finely_as_triton_specializes():
    """A kept binary (triton_kernels._Binaries) is reused only for launches Triton would compile
    the same: integers equal to 1, divisible by 16, beyond 32 bits, and each tensor's dtype and
    16-byte alignment change the key; launch hooks send launches through Triton."""
    from triton import knobs

    from loraplug.runtime.triton_kernels import _hooked, _specialization

    t = torch.zeros(64)
    key = _specialization((t, 32))
    assert key == _specialization((torch.ones(64), 48))
    for other in [(t, 1), (t, 33), (t, 2**40), (t.narrow(0, 1, 8), 32), (t.half(), 32)]:
        assert _specialization(other) != key, other
    assert _specialization((t, 2.0)) is None and _specialization((t, True)) is None
    assert not _hooked()
    knobs.runtime.launch_enter_hook.add(print)
    try:
        assert _hooked()
    finally:
        knobs.runtime.launch_enter_hook.remove(print)


def test_float_shape_rule_picks_the_measured_shapes(monkeypatch):
    """``LORAPLUG_KERNELS=shapes``: the fused kernel on Flux-dev's short-reduction image/single
    layers, the portable path on the long reductions and the 512-token text stream (132 SMs)."""
    fuses = lambda m, k, n: kernels.float_shape_fuses(m, k, n, 132)  # noqa: E731
    assert fuses(4608, 3072, 21504) and fuses(4096, 3072, 9216) and fuses(4096, 3072, 3072)
    assert not fuses(4608, 15360, 3072) and not fuses(4096, 12288, 3072)
    assert not fuses(512, 3072, 9216) and not fuses(512, 3072, 12288)
    monkeypatch.setenv("LORAPLUG_KERNELS", "shapes")
    assert kernels.on_float_shapes() and not kernels.on_float_bases()
    monkeypatch.setenv("LORAPLUG_KERNELS", "fp8")
    assert not kernels.on_float_shapes() and not kernels.on_float_bases()


def test_the_sm_count_is_read_once_and_traced_whole(monkeypatch):
    """``kernels.sm_count`` asks the device once (the fused path reads it per call) and traces into
    one graph whether or not it was read before (a plain dict, not a functools.cache wrapper)."""
    asked = []
    monkeypatch.setattr(kernels, "_SM_COUNTS", {})
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: asked.append(device) or SimpleNamespace(multi_processor_count=132),
    )
    cuda = torch.device("cuda", 0)
    assert [kernels.sm_count(cuda), kernels.sm_count(cuda)] == [132, 132] and asked == [cuda]
    torch._dynamo.reset()
    for device, count in ((torch.device("cpu"), 4), (cuda, 132)):  # first read while tracing; read before
        traced = torch.compile(lambda x, d=device: x * kernels.sm_count(d), backend="eager", fullgraph=True)
        assert traced(torch.ones(2)).tolist() == [count] * 2
    assert asked == [cuda] and kernels._SM_COUNTS == {cuda: 132, torch.device("cpu"): 4}
    torch._dynamo.reset()
