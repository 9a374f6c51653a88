"""Trained LoRAs on a frozen ``nn.Linear`` as one differentiable call (``runtime.train_gemm``): the
outputs and gradients of autograd through the separate GEMMs (``LORAPLUG_TRAIN_GEMM=0``) for
whole-output and q/k/v-slice adapters, one or two per slice, float32 and bf16 masters, with and
without bias and an input gradient; the two operators inside compiled forward and backward graphs;
the layers it leaves to autograd."""

from pathlib import Path

import pytest
import torch
from conftest import close
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import loraplug as lp
from loraplug import arch
from loraplug.runtime import train_gemm


@pytest.fixture(autouse=True)
def sliced(monkeypatch):
    """Names q/k/v (thirds of ``holder.layer``'s output) and ``layer`` (all of it)."""
    monkeypatch.setattr(arch, "PROVIDERS", [*arch.PROVIDERS, lambda model, ops: (
        {n: [arch.Target("layer", 16 * i, 16)] for i, n in enumerate("qkv")} if hasattr(model, "layer") else {},
        set())])  # fmt: skip


@pytest.fixture
def calls(monkeypatch):
    """How often the eager forward and backward of ``train_gemm`` ran."""
    seen = {"forward": 0, "backward": 0}
    for name in seen:
        original = getattr(train_gemm, name)
        monkeypatch.setattr(
            train_gemm, name, lambda *a, _f=original, _n=name: seen.__setitem__(_n, seen[_n] + 1) or _f(*a)
        )
    return seen


def _holder(bias: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.layer = nn.Linear(24, 48, bias=bias).to(dtype).requires_grad_(False)
    return holder


def _step(holder, handles, dtype, x_grad, gemm, monkeypatch) -> list[torch.Tensor]:
    """Output, input gradient (if asked) and the adapters' gradients of one backward pass."""
    monkeypatch.setenv("LORAPLUG_TRAIN_GEMM", "1" if gemm else "0")
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(x_grad)
    params = [p for h in handles for p in h.parameters()]
    for p in params:
        p.grad = None
    y = holder.layer(x)
    y.float().square().sum().backward()
    return [y.detach(), *([x.grad] if x_grad else []), *[p.grad for p in params]]


LAYOUTS = {"whole": [["^layer$"]], "q, k and v": [["^q$", "^k$", "^v$"]],
           "two on q, k and v": [["^q$", "^k$", "^v$"], ["^q$", "^k$", "^v$"]],
           "two on the whole output": [["^layer$"], ["^layer$"]]}  # fmt: skip


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dtype", "masters"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_call_gives_autograds_gradients(layout, dtype, masters, bias, x_grad, calls, monkeypatch):
    holder = _holder(bias, dtype)
    handles = [
        lp.create(holder, "lora", rank=3, alpha=1.5, targets=targets, init="random", dtype=masters, seed=i)
        for i, targets in enumerate(LAYOUTS[layout])
    ]
    got = _step(holder, handles, dtype, x_grad, True, monkeypatch)
    assert calls == {"forward": 1, "backward": 1}
    want = _step(holder, handles, dtype, x_grad, False, monkeypatch)
    assert calls == {"forward": 1, "backward": 1}
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        close(g.float(), w.float(), rtol=tol, atol=tol * w.float().abs().max().item())
    for h in handles:
        h.remove()


def test_compiled_graphs_call_the_two_operators(monkeypatch):
    """Under torch.compile the forward and backward graphs hold the operators (opaque: Inductor
    does not copy the accumulated outputs) and give eager's gradients."""
    holder = _holder(True, torch.float32)
    handle = lp.create(holder, "lora", rank=3, targets=["^q$", "^k$", "^v$"], init="random")
    want = _step(holder, [handle], torch.float32, True, True, monkeypatch)
    targets: list[str] = []

    def record(gm, _):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(holder.layer, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    holder.layer, plain = compiled, holder.layer
    got = _step(holder, [handle], torch.float32, True, True, monkeypatch)
    holder.layer = plain
    torch._dynamo.reset()
    assert "loraplug.lora_under_base_v2.default" in targets
    assert "loraplug.lora_under_base_v2_backward.default" in targets
    for g, w in zip(got, want, strict=True):
        close(g, w, rtol=1e-5, atol=1e-6)
    handle.remove()


def test_a_trained_base_weight_takes_autograd(calls, monkeypatch):
    """A base weight that trains too (the one call computes no weight gradient) and inference
    leave the call alone."""
    holder = _holder(True, torch.float32)
    handle = lp.create(holder, "lora", rank=3, targets=["^layer$"], init="random")
    holder.layer.weight.requires_grad_(True)
    _step(holder, [handle], torch.float32, True, True, monkeypatch)
    assert calls["forward"] == 0 and holder.layer.weight.grad is not None
    holder.layer.weight.requires_grad_(False)
    with torch.no_grad():
        holder.layer(torch.randn(3, 24))
    assert calls["forward"] == 0
    _step(holder, [handle], torch.float32, True, True, monkeypatch)
    assert calls == {"forward": 1, "backward": 1}
    handle.remove()


@pytest.mark.parametrize("need_dx", [True, False])
def test_operators_fakes_match_their_implementations(need_dx):
    """Shapes and strides (dD and dU transposed in memory) of both operators, traced and real."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(10, 24, generator=g), torch.randn(10, 48, generator=g)
    weight, bias = torch.randn(48, 24, generator=g), torch.randn(48, generator=g)
    down, up = torch.randn(24, 6, generator=g), torch.randn(6, 48, generator=g)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.loraplug.lora_under_base_v2, (x, weight, bias, down, up), test_utils=tests
    )
    h = x @ down
    args = (dy, x, weight, h, down, up, need_dx)
    torch.library.opcheck(torch.ops.loraplug.lora_under_base_v2_backward, args, test_utils=tests)
    _, d_down, d_up = train_gemm.backward(*args)
    assert d_down.t().is_contiguous() and d_up.t().is_contiguous()


@pytest.mark.parametrize("gemm", [True, False], ids=["one call", "autograd"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("masters", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["whole", "q, k and v", "two on q, k and v"])
def test_gradients_arrive_in_their_parameters_layout(layout, masters, compiled, gemm, calls, monkeypatch):
    """Each adapter's gradient reaches AccumulateGrad with its parameter's strides, through the one
    call and through autograd's GEMMs (the q/k/v slices' block up projection included): autograd
    stores it as it is (a mismatch costs one copy kernel per parameter and step, outside CUDA
    graphs)."""
    holder = _holder(False, torch.bfloat16)
    handles = [
        lp.create(holder, "lora", rank=3, targets=targets, init="random", dtype=masters, seed=i)
        for i, targets in enumerate(LAYOUTS[layout])
    ]
    seen = []
    for p in (p for h in handles for p in h.parameters()):
        p.register_hook(lambda grad, p=p: seen.append((tuple(p.shape), grad.stride(), p.stride())))
    if compiled:
        torch._dynamo.reset()
        holder.layer, plain = torch.compile(holder.layer), holder.layer
    _step(holder, handles, torch.bfloat16, True, gemm, monkeypatch)
    if compiled:
        holder.layer = plain
        torch._dynamo.reset()
    else:
        assert calls == ({"forward": 1, "backward": 1} if gemm else {"forward": 0, "backward": 0})
    assert len(seen) == sum(len(h.parameters()) for h in handles)
    assert [s for s in seen if s[1] != s[2]] == []
    for h in handles:
        h.remove()


def test_kconcat_probe_forms_match_float32():
    """benchmarks/kconcat_probe.py's forms (the K-concatenation with and without zero-padded ranks,
    the wide backward, the shipped one call) give the LoRA step's y, dx, dD, dU: the check its GPU
    run relies on before timing them, here in float32 on the CPU."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kconcat_probe.py"
    spec = importlib.util.spec_from_file_location("kconcat_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    errors = probe.check("cpu")
    assert {"one_call", "kconcat", "kconcat_pad", "wide_backward", "forward_kconcat_pad"} <= set(errors)
    assert max(max(e) for e in errors.values()) < 1e-5
