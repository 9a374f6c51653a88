"""The fused Triton path (runtime.kernels) against float32 references and the portable path, on the
GPU: bf16/fp16 Linear and Fp8Linear bases, slices that do and do not align with the tiles, several
adapters, strength changes, torch.compile, and the cases that must fall back."""

import pytest
import torch
from torch import nn

import loraplug as lp
from loraplug.fp8 import fp8_linear_reference
from loraplug.runtime import kernels
from loraplug.runtime.bypass import runners

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.available()), reason="needs CUDA + Triton"
)


def _layer(i, o, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias, device="cuda", dtype=dtype).requires_grad_(False)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def _fp8(i, o) -> nn.Sequential:
    """``_layer(i, o)`` quantized to an ``Fp8Linear`` (as ``model[0]``); skips below sm_89."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmul needs sm_89+")
    model = nn.Sequential(_layer(i, o, torch.bfloat16))
    lp.quantize_fp8(model)
    return model


def _lora(i, slices, rank, seed):
    """(down, up) in float32 per (offset, size) output slice."""
    g = torch.Generator().manual_seed(seed)
    return {
        (off, size): (torch.randn(rank, i, generator=g) * 0.1, torch.randn(size, rank, generator=g) * 0.1)
        for off, size in slices
    }


@pytest.fixture(autouse=True)
def fused_on_float_bases(monkeypatch):
    """bf16/fp16 Linear layers take the fused kernel only when opted in."""
    monkeypatch.setenv("LORAPLUG_KERNELS", "all")


@pytest.fixture(autouse=True)
def slice_names(monkeypatch):
    """Let a test name arbitrary output slices of ``holder.layer`` (``holder.slices``)."""
    from loraplug import arch

    def provider(model, ops):
        slices = getattr(model, "slices", {})
        return {name: [arch.Target("layer", off, size)] for name, (off, size) in slices.items()}, set()

    monkeypatch.setattr(arch, "PROVIDERS", [*arch.PROVIDERS, provider])


def _apply(layer, parts, strengths, dtype):
    holder = nn.Module()
    holder.layer = layer
    holder.slices = {}
    adapters = []
    for k, part in enumerate(parts):
        sd = {}
        for n, ((off, size), (a, b)) in enumerate(part.items()):
            name = f"a{k}s{n}"
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = a.to(dtype), b.to(dtype)
            holder.slices[name] = (off, size)
        adapters.append(lp.load(sd, name=f"a{k}"))
    handle = lp.apply(holder, adapters, strength=strengths)
    assert handle.report.ok, handle.report.unmatched
    return handle


def _reference(layer, x, parts, strengths, base=None):
    y = (x.float() @ layer.weight.float().T if base is None else base.float()).clone()
    if base is None and layer.bias is not None:
        y += layer.bias.float()
    for part, s in zip(parts, strengths, strict=True):
        for (off, size), (a, b) in part.items():
            y[:, off : off + size] += s * (x.float() @ a.cuda().T) @ b.cuda().T
    return y


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m, i, o, slices",
    [
        (4096, 3072, 3 * 3072, [(0, 3072), (3072, 3072), (6144, 3072)]),  # Flux qkv
        (333, 256, 640, [(0, 200), (200, 150), (350, 290)]),  # ragged rows, slices across tiles
        (77, 128, 96, [(0, 96)]),  # narrower than one tile
    ],
)
def test_fused_matches_float32_and_portable(dtype, m, i, o, slices, flatten, whole, monkeypatch):
    """Both tile loops (the benchmarks pick one per GPU; host-made descriptors with the flattened
    one, device-made with the other); slices off the tile grid; with a
    whole-output adapter beside the slice adapters (repeated h columns, a tail of two 16-rank
    steps) and without (one step)."""
    monkeypatch.setitem(
        kernels.CONFIGS, "bf16", kernels.config(False)._replace(flatten=flatten, device_desc=flatten)
    )
    layer = _layer(i, o, dtype)
    parts = [_lora(i, slices, 16, 1), _lora(i, [(0, o)], 8, 2)][: 2 if whole else 1]
    strengths, changed = [0.7, 1.3][: len(parts)], [0.0, 2.0][: len(parts)]
    x = torch.randn(m, i, device="cuda", dtype=dtype)
    handle = _apply(layer, parts, strengths, dtype)
    runner = runners(layer)
    assert runner.fused and "forward" in layer.__dict__
    fused = runner._fused_output(layer, x)
    assert fused is not None and torch.isfinite(fused).all()
    ref = _reference(layer, x, parts, strengths)
    assert torch.equal(layer(x), fused)
    portable = runner._run(layer, (x,), {}, type(layer).forward(layer, x))
    assert _rel(fused, ref) <= max(1.5 * _rel(portable, ref), 2e-3)
    handle.set_strength(changed)  # in-place scale: no repack
    assert _rel(layer(x), _reference(layer, x, parts, changed)) < 1e-2
    handle.remove()
    assert "forward" not in layer.__dict__ and runners(layer) is None


@pytest.mark.parametrize(
    "flatten, device_desc, tokens, ws",
    [(True, True, 1000, False), (False, True, 1000, False), (True, False, 1000, False), (True, True, 512, False),
     (False, True, 1000, True)],
)  # fmt: skip
def test_fp8_base_with_lora_matches_reference(flatten, device_desc, tokens, ws, monkeypatch):
    """512 tokens: 144 full tiles on 132 multiprocessors, the narrow tiles run;
    ws: Triton's warp specialization of the full tiles."""
    fp8 = _fp8(3072, 3 * 3072)[0]
    tiles = kernels.config(True)._replace(flatten=flatten, device_desc=device_desc, ws=ws)
    monkeypatch.setitem(kernels.CONFIGS, "fp8", tiles)
    x = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16)
    narrow = kernels.config_for(
        True, tokens, 3 * 3072, torch.cuda.get_device_properties(0).multi_processor_count
    )
    assert (narrow.bn < tiles.bn) == (tokens == 512)
    base = fp8_linear_reference(x, fp8.weight, fp8.weight_scale, fp8.bias)
    assert _rel(fp8(x), base) < 2e-3
    slices = [(0, 3072), (3072, 3072), (6144, 3072)]
    parts = [_lora(3072, slices, 16, 3)]
    handle = _apply(fp8, parts, [1.0], torch.bfloat16)
    assert runners(fp8)._fused_output(fp8, x) is not None
    ref = _reference(fp8, x, parts, [1.0], base=base)
    assert _rel(fp8(x), ref) < 2e-2  # Triton fp8 GEMM vs torch reference: accumulation order and precision
    handle.remove()
    assert _rel(fp8(x), base) < 2e-3


_QKV = [(0, 3072), (3072, 3072), (6144, 3072)]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [512, 1000])
@pytest.mark.parametrize(
    "layout",
    [
        [(_QKV, 4)],
        [(_QKV, 4), ([(0, 9216)], 12)],
        [([(0, 9216)], 4)],
        [([(0, 9216)], 4), ([(0, 9216)], 4)],
        [(_QKV, 16)],
    ],
    ids=["qkv4", "qkv4+whole12", "whole4", "whole4+whole4", "qkv16"],
)
def test_ranks_off_the_multiple_of_eight(fp8, tokens, layout):
    """The packing pads nothing and every tail moves by TMA: runs starting off the 16-byte grid
    (rank 4 on q/k/v; 4 + 12) are loaded from the grid line and shifted, runs from column 0 (one
    or two whole-output rank-4 LoRAs) and rank 16 are not; 512 tokens: the narrow tiles."""
    layer = _fp8(3072, 9216)[0] if fp8 else _layer(3072, 9216, torch.bfloat16)
    parts = [_lora(3072, slices, rank, 10 + k) for k, (slices, rank) in enumerate(layout)]
    strengths = [1.0] * len(parts)
    x = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16)
    base = fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias) if fp8 else None
    handle = _apply(layer, parts, strengths, torch.bfloat16)
    fused = runners(layer)._fused_output(layer, x)
    assert fused is not None and torch.isfinite(fused).all()
    assert _rel(fused, _reference(layer, x, parts, strengths, base=base)) < (2e-2 if fp8 else 5e-3)
    handle.remove()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("rank", [4, 20])
@pytest.mark.parametrize(
    "flatten, device_desc, ws", [(True, False, False), (False, True, False), (False, True, True)]
)
def test_shifted_tails_under_every_tile_loop(fp8, rank, flatten, device_desc, ws, monkeypatch):
    """Runs off the 16-byte grid (one LoRA on q/k/v: runs from columns r and 2r) with host-made
    descriptors, the unflattened tile loop, warp specialization asked for (such launches are
    flattened), one step of the tail (rank 4) and two (rank 20)."""
    key = "fp8" if fp8 else "bf16"
    monkeypatch.setitem(
        kernels.CONFIGS, key, kernels.config(fp8)._replace(flatten=flatten, device_desc=device_desc, ws=ws)
    )
    layer = _fp8(3072, 9216)[0] if fp8 else _layer(3072, 9216, torch.bfloat16)
    parts = [_lora(3072, _QKV, rank, 20)]
    x = torch.randn(1000, 3072, device="cuda", dtype=torch.bfloat16)
    base = fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias) if fp8 else None
    handle = _apply(layer, parts, [0.8], torch.bfloat16)
    runner = runners(layer)
    fused = runner._fused_output(layer, x)
    assert next(iter(runner._lowrank.values())).packed(kernels.config(fp8).bn).hstart.dim() == 2
    assert fused is not None and torch.isfinite(fused).all()
    assert _rel(fused, _reference(layer, x, parts, [0.8], base=base)) < (2e-2 if fp8 else 5e-3)
    handle.remove()


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_fused_path_is_one_graph_and_does_not_recompile_on_strength(fp8, monkeypatch):
    """The fused kernel as an operator inside one graph (a host-side check of the weight's address
    broke the graph at every fused layer) on float bases (opted in) and fp8 bases (by default);
    strength changes reuse it."""
    if fp8:
        if torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("fp8 + adapters take the fused operator in graphs by default from Hopper on")
        monkeypatch.delenv("LORAPLUG_KERNELS")  # fp8 + adapters: fused in compiled graphs by default
    layer = _fp8(512, 1536)[0] if fp8 else _layer(512, 1536, torch.bfloat16)
    parts = [_lora(512, [(0, 512), (512, 512), (1024, 512)], 16, 4)]
    handle = _apply(layer, parts, [1.0], torch.bfloat16)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = {}
        for s in (0.3, 1.5, 1.0):  # eager outputs (the fused kernel launched directly)
            handle.set_strength(s)
            want[s] = layer(x)
        graphs = []
        recorded = torch.compile(
            layer, fullgraph=True, backend=lambda gm, _: graphs.append(gm.code) or gm.forward
        )
        recorded(x)
        assert "loraplug.lora_linear" in graphs[0]
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        assert _rel(compiled(x), want[1.0]) < 1e-3
        with torch._dynamo.config.patch(error_on_recompile=True):
            for s in (0.3, 1.5):
                handle.set_strength(s)
                assert _rel(compiled(x), want[s]) < 1e-3
    handle.remove()
    torch._dynamo.reset()


def test_fused_operator_under_cuda_graphs(monkeypatch):
    """fp8 + LoRA (the fused operator, by default) under ``mode="reduce-overhead"``: replays with
    new inputs and a new strength give the eager outputs (the kernel's TMA descriptors are made
    on the device, in scratch memory the graph's pool keeps)."""
    layer = _fp8(512, 1536)[0]
    monkeypatch.delenv("LORAPLUG_KERNELS")
    parts = [_lora(512, [(0, 512), (512, 512), (1024, 512)], 16, 6)]
    handle = _apply(layer, parts, [1.0], torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, mode="reduce-overhead")
    with torch.no_grad():
        for step, strength in enumerate((1.0, 1.0, 0.5, 0.5)):
            handle.set_strength(strength)
            x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
            want = layer(x)
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(x).clone()
            assert _rel(got, want) < 1e-3, (step, strength)
    handle.remove()
    torch._dynamo.reset()


@pytest.mark.parametrize("beside", [True, False])
def test_fp8_layer_captured_in_a_cuda_graph(beside, monkeypatch):
    """Captured, the quantization and the down projection run as two parallel branches of the
    graph (a side stream joined inside the call); replays with new inputs give the eager output."""
    from loraplug.runtime import triton_kernels

    monkeypatch.setattr(triton_kernels, "DOWN_BESIDE_QUANTIZATION", beside)
    layer = _fp8(1024, 3072)[0]
    parts = [_lora(1024, [(0, 1024), (1024, 1024), (2048, 1024)], 16, 7)]
    handle = _apply(layer, parts, [1.0], torch.bfloat16)
    static_x = torch.randn(700, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(static_x)  # compiles and keeps the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            assert _rel(static_y, layer(static_x)) < 1e-3
    handle.remove()


def test_portable_layer_captured_in_a_cuda_graph_follows_strength_changes(monkeypatch):
    """The portable eager path passes each slice's scale·strength to its GEMM as a number, except
    while a CUDA graph is captured: there the strengths' tensors are read, so a replay after
    ``set_strength`` gives the new strength's output, not the captured one's."""
    monkeypatch.setenv("LORAPLUG_KERNELS", "fp8")  # bf16 bases on the portable path
    layer = _layer(512, 1536, torch.bfloat16)
    parts = [_lora(512, [(0, 512), (512, 512), (1024, 512)], 16, 8)]
    handle = _apply(layer, parts, [1.0], torch.bfloat16)
    static_x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for strength in (1.0, 0.25, -1.5):
            handle.set_strength(strength)
            graph.replay()
            assert _rel(static_y, layer(static_x)) < 1e-2, strength  # a stale strength: ~0.6
    handle.remove()


def test_compiling_an_fp8_layer_warns_nothing():
    """The capability lookup is not a cached function inside a graph (Dynamo warned once per
    process that it ignores the cache wrapper)."""
    import warnings

    model = _fp8(256, 512)
    torch._dynamo.reset()
    torch._dynamo.utils.warn_once_cache.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(model, fullgraph=True)(torch.randn(64, 256, device="cuda", dtype=torch.bfloat16))
    torch._dynamo.reset()
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_compiled_fp8_layer_without_adapters_takes_the_kernel_on_hopper(monkeypatch):
    """By default a compiled graph runs an fp8 layer without adapters on the Triton kernels from
    Hopper on (``kernels.here``), ``torch._scaled_mm`` before; the eager output either way,
    compiled and under CUDA graphs."""
    monkeypatch.delenv("LORAPLUG_KERNELS")
    model = _fp8(512, 1536)
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(x)
    called = " ".join(str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function")
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert ("loraplug.lora_linear" in called, "_scaled_mm" in called) == (hopper, not hopper), called
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        compiled = torch.compile(model, mode=mode, fullgraph=True)
        with torch.no_grad():
            for _ in range(3):
                x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
                want = model(x)
                torch.compiler.cudagraph_mark_step_begin()
                assert _rel(compiled(x).clone(), want) < 1e-3, mode
    torch._dynamo.reset()


def test_fallbacks_masks_and_gradients():
    layer = _layer(256, 512, torch.bfloat16)
    parts = [_lora(256, [(0, 512)], 8, 5)]
    handle = _apply(layer, parts, [1.0], torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert runners(layer)._fused_output(layer, x) is None  # x needs a gradient: portable path
    y = layer(x)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    handle.set_mask(torch.zeros(1, 64, 1, device="cuda"))
    with torch.no_grad():
        xm = x.detach()[None]
        assert runners(layer)._fused_output(layer, xm) is None
        assert _rel(layer(xm)[0], _reference(layer, xm[0], parts, [0.0])) < 1e-2
    handle.remove()


def test_fp8_base_passes_gradients_on_the_gpu():
    model = _fp8(256, 384)
    x = torch.randn(100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(100, 384, device="cuda", dtype=torch.bfloat16)
    y = model(x)
    assert (
        _rel(y, fp8_linear_reference(x.detach(), model[0].weight, model[0].weight_scale, model[0].bias))
        < 2e-2
    )
    y.backward(grad)
    assert _rel(x.grad, grad.float() @ model[0].dequantized()) < 1e-2


@pytest.mark.parametrize("setting", [None, "fp8", "shapes"])
def test_float_bases_take_the_kernel_where_measured_or_opted_in(setting, monkeypatch):
    """By default a bf16 Linear takes the fused kernel on the GPUs where that was measured faster
    (kernels.FLOAT_SHAPES_GPUS), on the shapes float_shape_fuses picks, else the portable path;
    the output is the portable path's either way."""
    if setting is None:
        monkeypatch.delenv("LORAPLUG_KERNELS")
    else:
        monkeypatch.setenv("LORAPLUG_KERNELS", setting)
    measured = any(gpu in torch.cuda.get_device_name() for gpu in kernels.FLOAT_SHAPES_GPUS)
    on = setting == "shapes" or (setting is None and measured)
    layer = _layer(3072, 9216, torch.bfloat16)
    parts = [_lora(3072, [(0, 3072), (3072, 3072), (6144, 3072)], 16, 7)]
    handle = _apply(layer, parts, [1.0], torch.bfloat16)
    runner = runners(layer)
    assert runner.fused == on and runner.accumulating
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    with torch.no_grad():
        fuses = runner.fused and runner._fused_group(layer, x) is not None
        assert fuses == (on and hopper)  # K 3072, many tiles
        assert not runner.fused or runner._fused_group(layer, x[:512]) is None  # the text stream: few tiles
        got = layer(x)
        portable = runner._run(layer, (x,), {}, type(layer).forward(layer, x))
    ref = _reference(layer, x, parts, [1.0])
    assert _rel(got, ref) <= max(1.5 * _rel(portable, ref), 2e-3)
    handle.remove()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "slices, covered",
    [
        ([(0, 3072), (3072, 3072), (6144, 3072)], True),  # Flux qkv: three runs side by side
        ([(0, 9216)], True),  # one whole-output run
        ([(0, 3072)], False),  # q only: the hook order
    ],
)
def test_accumulating_base_gemm_matches_the_hooked_path(slices, covered, bias, monkeypatch):
    """Tracked calls: cuBLAS accumulating into the adapters' output (slices through one
    block-diagonal up) against float32 and the hooked order, two stacked LoRAs, strength change,
    gradients; eager inference keeps the hooked order."""
    monkeypatch.setenv("LORAPLUG_KERNELS", "0")
    layer = _layer(3072, 9216, torch.bfloat16, bias=bias)
    parts = [_lora(3072, slices, 16, 1), _lora(3072, slices, 16, 2)]
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    handle = _apply(layer, parts, [0.7, 1.3], torch.bfloat16)
    runner = runners(layer)
    assert runner._accumulated_output(layer, x) is None  # eager inference: the hooked order
    hooked = runner._run(layer, (x,), {}, type(layer).forward(layer, x))
    ref = _reference(layer, x, parts, [0.7, 1.3])
    xt = x.clone().requires_grad_(True)  # tracked: the accumulating GEMM (slices: block-diagonal ups)
    assert (runner._accumulated_output(layer, xt) is not None) == covered
    assert _rel(layer(xt).detach(), ref) <= max(1.5 * _rel(hooked, ref), 2e-3)
    handle.set_strength([0.0, 2.0])
    assert _rel(layer(x), _reference(layer, x, parts, [0.0, 2.0])) < 1e-2
    xg = x[:256].clone().requires_grad_(True)
    layer(xg).float().square().sum().backward()
    want = xg.detach().clone().requires_grad_(True)
    runner._run(layer, (want,), {}, type(layer).forward(layer, want)).float().square().sum().backward()
    assert _rel(xg.grad, want.grad) < 1e-2
    handle.remove()
    assert "forward" not in layer.__dict__


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("fp8", [False, True])
def test_kept_binaries_launch_exactly_as_triton_does(fp8, tma, monkeypatch):
    """Launches through a kept binary (runtime.triton_kernels._Binaries) give bit for bit what
    Triton's own launch gives, across the specializations a binary must not be reused for: row
    counts of 1, of multiples of 16 and not, with and without bias and LoRA tail, fp8 or not, the
    TMA kernel and the pointer-load kernel (what GPUs before Hopper run)."""
    from loraplug.runtime import triton_kernels as tk

    kind = "fp8" if fp8 else "bf16"
    monkeypatch.setitem(kernels.CONFIGS, kind, kernels.config(fp8)._replace(tma=tma))
    layer = _fp8(512, 768)[0] if fp8 else _layer(512, 768, torch.bfloat16)
    bn = kernels.config(fp8).bn
    g = torch.Generator(device="cuda").manual_seed(0)
    ups = [torch.randn(16, 768, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1]
    packing = kernels.pack_ups([(0, 16, 0, 768)], ups, 768, bn)
    scale = torch.rand(16, device="cuda", dtype=torch.float32)
    kernels_used = (tk._TMA_KERNEL, tk._POINTER_KERNEL, tk._QUANTIZE_KERNEL)
    through_triton = []
    for kernel in kernels_used:
        kernel.kept.clear()
        jit = kernel.kernel
        monkeypatch.setattr(
            jit, "run", lambda *a, _run=jit.run, **k: through_triton.append(1) or _run(*a, **k)
        )

    def run(m, bias, tail):
        x = torch.randn(m, 512, device="cuda", generator=g, dtype=torch.bfloat16)
        h = torch.randn(m, 16, device="cuda", generator=g, dtype=torch.bfloat16)
        lora = (h, packing.hstart, scale, packing.packed) if tail else None
        scales = (None, layer.weight_scale) if fp8 else None
        b = layer.bias.to(torch.bfloat16) if bias else None
        launch = lambda: tk.lora_linear(x, layer.weight, b, lora, scales, torch.bfloat16)  # noqa: E731
        kept = launch()  # through Triton the first time a specialization is seen, then kept
        through_triton.clear()
        assert torch.equal(launch(), kept)
        assert not through_triton, "a kept specialization went through Triton's launcher again"
        for kernel in kernels_used:
            kernel.kept.clear()
        assert torch.equal(launch(), kept), f"m={m} bias={bias} tail={tail}: Triton's launch differs"

    for m in (1, 2, 16, 17, 300, 1):
        for bias in (False, True):
            for tail in (False, True):
                run(m, bias, tail)
                run(m, bias, tail)  # kept this time
