"""The accumulating base GEMM (a plain Linear's base product runs last, into the adapters' output)
against the hooked order (base first, adapters added after it): same outputs and gradients for
whole-output and sliced adapters, the cases that must keep the hooked order, deep copies, and
one graph under torch.compile for inference and training."""

import copy
import io
import pickle

import pytest
import torch
from conftest import close, compiled_graphs
from torch import nn

import loraplug as lp
from loraplug import arch
from loraplug.runtime.bypass import runners
from loraplug.testing import flux_inputs, tiny_flux


@pytest.fixture
def sliced(monkeypatch):
    """Names q/k/v (thirds of ``holder.layer``'s output) and ``layer`` (all of it)."""
    monkeypatch.setattr(arch, "PROVIDERS", [*arch.PROVIDERS, lambda model, ops: (
        {n: [arch.Target("layer", 16 * i, 16)] for i, n in enumerate("qkv")} if hasattr(model, "layer") else {},
        set())])  # fmt: skip


def _holder(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.layer = nn.Linear(24, 48, bias=bias)
    return holder


def _lora(names: str, seed: int, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names.split():
        width = 48 if name == "layer" else size
        sd[f"{name}.lora_A.weight"] = torch.randn(3, 24, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(width, 3, generator=g)
    return sd


LAYOUTS = {  # adapters' targets, whether the accumulating GEMM takes tracked and compiled calls
    "whole": (["layer"], True),
    "two stacked on the whole output": (["layer", "layer"], True),
    "q, k and v": (["q k v"], True),
    "q, k, v twice": (["q k v", "q k v"], True),
    "q only": (["q"], False),  # part of the output bare
    "slices and the whole output": (["q k v layer"], False),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accumulating_equals_the_hooked_order(layout, bias, sliced, monkeypatch):
    names, tracked = LAYOUTS[layout]
    holder = _holder(bias)
    adapters = [lp.load(_lora(n, seed), name=f"a{seed}") for seed, n in enumerate(names)]
    strengths = [0.7, -1.3][: len(adapters)]
    handle = lp.apply(holder, adapters, strength=strengths)
    assert handle.report.ok, handle.report.unmatched
    runner = runners(holder.layer)
    assert runner.accumulating and "forward" in holder.layer.__dict__
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert runner._accumulated_output(holder.layer, x) is None  # eager inference: hooked order
        compiled = []
        for value in ("1", "all"):  # traced: the out-of-place add after the base; the accumulating GEMM
            monkeypatch.setenv("LORAPLUG_ACCUMULATE", value)
            torch._dynamo.reset()
            compiled.append(torch.compile(holder.layer, backend="eager")(x))
        torch._dynamo.reset()
        monkeypatch.delenv("LORAPLUG_ACCUMULATE")
    xg = x.clone().requires_grad_(True)
    assert (runner._accumulated_output(holder.layer, xg) is not None) == tracked
    holder.layer(xg).square().sum().backward()
    monkeypatch.setenv("LORAPLUG_ACCUMULATE", "0")  # read at call time: the same runner, hooked order
    assert runner._accumulated_output(holder.layer, xg) is None
    with torch.no_grad():
        want = holder.layer(x)
    xw = x.clone().requires_grad_(True)
    holder.layer(xw).square().sum().backward()
    for got in compiled:
        close(got, want, rtol=1e-5, atol=1e-5)
    close(xg.grad, xw.grad, rtol=1e-4, atol=1e-4)
    handle.remove()
    assert "forward" not in holder.layer.__dict__ and runners(holder.layer) is None


def test_trained_slices_get_the_same_gradients(monkeypatch):
    """Training per-slice adapters on a fused qkv (block-diagonal up projection, base GEMM last)
    gives the adapters the gradients of the hooked order."""

    def grads(accumulate: str) -> list[torch.Tensor]:
        monkeypatch.setenv("LORAPLUG_ACCUMULATE", accumulate)
        model = tiny_flux()
        model.fuse_qkv_projections()
        torch.manual_seed(1)
        handle = lp.create(model, "lora", rank=2, targets="attn", init="random")
        assert handle.report.ok and handle.report.fused
        model(**flux_inputs())[0].square().mean().backward()
        out = [p.grad.clone() for p in handle.parameters()]
        handle.remove()
        return out

    for got, want in zip(grads("1"), grads("0"), strict=True):
        close(got, want, rtol=1e-4, atol=1e-6)


def test_compiled_graphs_add_after_the_base_unless_asked(monkeypatch):
    """In a compiled graph the adapters' product is added after the base GEMM, out of place (the
    accumulating GEMM's in-place form copies y there); LORAPLUG_ACCUMULATE=all accumulates."""
    holder = _holder(True)
    lp.apply(holder, _lora("layer", 0))
    runner = runners(holder.layer)
    seen = []

    def spy(layer, x):
        seen.append(runner._accumulated_output(layer, x) is not None)
        return layer(x)

    for value, accumulating in (("1", False), ("all", True), ("0", False)):
        monkeypatch.setenv("LORAPLUG_ACCUMULATE", value)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(spy, backend="eager")(holder.layer, torch.randn(4, 24))
        assert seen.pop() is accumulating, value
    torch._dynamo.reset()


def test_compiled_adapters_do_not_copy_the_base_output():
    """Inductor rewrites add(y, mm(h, up)) as addmm(y, h, up), which copies y into a new buffer
    before the GEMM (56 device copies in 12 Flux blocks, in the accumulating form); the product is
    reshaped before the add, which then fuses into the next kernel."""
    from torch._inductor.utils import run_and_get_code

    holder = _holder(False)  # no bias: the base product is a plain mm too
    lp.apply(holder, _lora("layer", 0))
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        want = holder.layer(x)
        torch._dynamo.reset()
        got, codes = run_and_get_code(torch.compile(holder.layer), x)
        torch._dynamo.reset()
    code = "\n".join(codes)
    assert "addmm" not in code and code.count("extern_kernels.mm(") == 3, code
    close(got, want, rtol=1e-5, atol=1e-5)


def test_autocast_to_another_dtype_keeps_the_hooked_order():
    holder = _holder(True)
    lp.apply(holder, _lora("layer", 0))
    x = torch.randn(4, 24, requires_grad=True)
    runner = runners(holder.layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert runner._accumulated_output(holder.layer, x) is None
        assert holder.layer(x).dtype == torch.bfloat16
    assert runner._accumulated_output(holder.layer, x) is not None


def test_a_deep_copy_computes_with_its_own_weights():
    """The runner's forward holds its module: a copied model (an EMA copy, say) uses the copy's
    weights and adapters, and keeps working when the original is gone."""
    holder = _holder(True)
    sd = _lora("layer", 0)
    handle = lp.apply(holder, sd, strength=0.5)
    x = torch.randn(4, 24)
    with torch.no_grad():
        before = holder.layer(x)
        twin = copy.deepcopy(holder)
        twin.layer.weight.add_(1.0)
        want = before + x.sum(-1, keepdim=True)
        close(twin.layer(x), want, rtol=1e-5, atol=1e-5)
        close(holder.layer(x), before, rtol=0, atol=0)
        handle.remove()
        del holder
        close(twin.layer(x), want, rtol=1e-5, atol=1e-5)


def test_compiled_training_and_inference_are_one_graph():
    """No graph breaks with the bypass inside (a lazily cached property's lock and a sort by tuple
    keys each broke the graph at every adapted module)."""
    model = tiny_flux()
    model.fuse_qkv_projections()
    handle = lp.create(model, "lora", rank=2, targets="attn+mlp", init="random")
    inputs = flux_inputs()
    assert len(compiled_graphs(model, lambda m: m(**inputs)[0].square().mean().backward())[1]) == 1
    handle.remove()
    trained = lp.apply(model, [handle.adapters[0], handle.adapters[0]], strength=[0.5, 1.0])
    with torch.no_grad():
        assert len(compiled_graphs(model, lambda m: m(**inputs))[1]) == 1
    trained.remove()


@pytest.mark.parametrize("accumulate", ["1", "0"])
def test_a_model_in_training_deep_copies(accumulate, monkeypatch):
    """Copying a model with trainable adapters (an EMA copy) gives the copy its own adapters,
    runners and strengths; training or removing on the original leaves the copy as it was."""
    monkeypatch.setenv("LORAPLUG_ACCUMULATE", accumulate)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    handle = lp.create(model, "lora", rank=2, targets="all-linear", init="random")
    x = torch.randn(3, 8)
    model(x).square().mean().backward()  # the runners' caches now hold views of the parameters
    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = model(x)
        close(twin(x), want, rtol=0, atol=0)
        assert runners(twin[0]) is not runners(model[0]) and runners(twin[0]).module_ref() is twin[0]
        for p in handle.parameters():
            p.add_(1.0)
        handle.set_strength(0.3)
        close(twin(x), want, rtol=0, atol=0)
        handle.remove()
        assert runners(model[0]) is None
        close(twin(x), want, rtol=0, atol=0)


def test_a_model_with_adapters_pickles(tmp_path):
    """torch.save of a whole model with adapters applied (a runner owning a Linear's forward, a
    hook on a conv) loads with the same outputs; a handle pickled with its model steers the copy
    only; a merge handle restores its copy's original bytes (an fp8 weight's too); a training
    handle pickled with its model trains the copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 8))
    g = torch.Generator().manual_seed(0)
    sd = {"0.lora_down.weight": torch.randn(2, 2, 3, 3, generator=g), "0.lora_up.weight": torch.randn(4, 2, 1, 1, generator=g),
          "2.lora_A.weight": torch.randn(2, 64, generator=g), "2.lora_B.weight": torch.randn(8, 2, generator=g)}  # fmt: skip
    handle = lp.apply(model, sd, strength=0.7)
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        want = model(x)
        path = tmp_path / "model.pt"
        torch.save(model, path)
        loaded = torch.load(path, weights_only=False)  # our own file: the model object itself
        close(loaded(x), want, rtol=0, atol=0)
        twin, twin_handle = pickle.loads(pickle.dumps((model, handle)))
        assert runners(twin[2]) is not runners(model[2]) and runners(twin[2]).module_ref() is twin[2]
        twin_handle.remove()
        assert runners(twin[0]) is None and runners(twin[2]) is None and "forward" not in twin[2].__dict__
        handle.remove()
        close(twin(x), model(x), rtol=0, atol=0)
        assert (twin(x) - want).abs().max() > 1e-3
    merged = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 8))
    lp.quantize_fp8(merged, targets="^1$")  # a quantized weight: its merge state names its scheme
    original = [t.clone() for t in merged.state_dict().values()]
    sd = {"0.lora_A.weight": torch.randn(2, 64), "0.lora_B.weight": torch.randn(8, 2),
          "1.lora_A.weight": torch.randn(2, 8), "1.lora_B.weight": torch.randn(8, 2)}  # fmt: skip
    merge_handle = lp.merge(merged, sd)
    buffer = io.BytesIO()  # torch.save: plain pickle fails on fp8 tensors (torch's own limitation)
    torch.save((merged, merge_handle), buffer)
    copy_, copy_handle = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    copy_handle.remove()  # the original bytes travelled with the handle
    assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), original, strict=True))
    assert not torch.equal(merged[0].weight, original[0])
    trained = nn.Sequential(nn.Linear(8, 8))
    train_handle = lp.create(trained, "lora", rank=2, targets="all-linear", init="random")
    copied, copied_handle = pickle.loads(pickle.dumps((trained, train_handle)))
    data = [(torch.randn(16, 8), torch.randn(16, 8))]
    before = [p.clone() for p in train_handle.parameters()]
    lp.train(copied_handle, data, lambda b: ((copied(b[0]) - b[1]) ** 2).mean(), steps=2, lr=1e-2,
             progress=False, compile=True)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, train_handle.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, copied_handle.parameters(), strict=True))


def test_a_forward_wrapped_after_apply_survives_removal():
    """A tool that wraps the module's forward after apply (accelerate's offload hooks do) keeps
    calling the runner's forward; once the adapters are removed that forward is the plain layer."""
    holder = _holder(True)
    x = torch.randn(4, 24, requires_grad=True)
    want = holder.layer(x)
    handle = lp.apply(holder, _lora("layer", 0))
    inner = holder.layer.forward
    holder.layer.forward = lambda *a, **k: inner(*a, **k)  # the other tool's wrapper
    assert not torch.allclose(holder.layer(x), want)
    handle.remove()
    assert "forward" in holder.layer.__dict__  # the wrapper stays, it is not ours to delete
    close(holder.layer(x), want, rtol=0, atol=0)


def test_a_model_with_adapters_is_freed_without_the_cycle_collector(sliced):
    """The runner's forward is its bound method and the runner holds its module weakly: deleting
    the model frees it (and its GPU memory) at once, not at the next garbage collection."""
    import gc
    import weakref

    gc.disable()
    try:
        holder = _holder(True)
        lp.apply(holder, [_lora("layer", 0), _lora("q k v", 1)])
        assert "forward" in holder.layer.__dict__
        ref = weakref.ref(holder.layer)
        del holder
        assert ref() is None
    finally:
        gc.enable()
