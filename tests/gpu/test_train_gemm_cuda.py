"""The one-call training GEMMs (``runtime.train_gemm``, the default for LoRAs trained on a frozen
Linear) on CUDA at Flux-dev width: output and every gradient against float32 autograd, eager and
compiled by Inductor, one LoRA per q/k/v slice of a fused projection."""

import pytest
import torch
from torch import nn

import loraplug as lp
from loraplug import arch
from loraplug.runtime import train_gemm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

K, N, RANK = 3072, 3 * 3072, 16


@pytest.fixture(autouse=True)
def sliced(monkeypatch):
    """Names q/k/v (thirds of ``holder.layer``'s output)."""
    monkeypatch.setattr(arch, "PROVIDERS", [*arch.PROVIDERS, lambda model, ops: (
        {n: [arch.Target("layer", N // 3 * i, N // 3)] for i, n in enumerate("qkv")} if hasattr(model, "layer") else {},
        set())])  # fmt: skip


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("masters", [torch.float32, torch.bfloat16])
def test_fused_qkv_one_call_matches_float32_autograd(masters, compiled, monkeypatch):
    monkeypatch.setenv("LORAPLUG_TRAIN_GEMM", "1")
    seen = {"forward": 0}
    original = train_gemm.forward
    monkeypatch.setattr(train_gemm, "forward", lambda *a: seen.__setitem__("forward", 1) or original(*a))
    torch.manual_seed(0)
    holder = nn.Module()
    holder.layer = nn.Linear(K, N).cuda().bfloat16().requires_grad_(False)
    handle = lp.create(
        holder, "lora", rank=RANK, alpha=8, targets=["^q$", "^k$", "^v$"], init="random", dtype=masters
    )
    x = torch.randn(2, 700, K, device="cuda").bfloat16().requires_grad_()
    dy = torch.randn(2, 700, N, device="cuda").bfloat16()
    layer = holder.layer
    if compiled:
        torch._dynamo.reset()
        layer = torch.compile(holder.layer)
    y = layer(x)
    y.backward(dy)
    adapters = handle.adapters[0].adapters
    assert all(
        t.dtype == masters and t.grad is not None and t.grad.dtype == masters for t in handle.parameters()
    )
    assert compiled or seen["forward"]

    # float32 autograd over the same weights: W x + b + Σ_slices alpha / rank · up_s down_s x
    x32 = x.detach().float().requires_grad_()
    ref = x32 @ holder.layer.weight.float().T + holder.layer.bias.float()
    masters32 = {
        (s, k): t.detach().float().requires_grad_() for s in "qkv" for k, t in adapters[s].tensors.items()
    }
    parts = [(x32 @ masters32[s, "down"].T) @ masters32[s, "up"].T * (8 / RANK) for s in "qkv"]
    ref = ref + torch.cat(parts, -1)
    ref.backward(dy.float())
    assert _rel(y, ref) < 1e-2
    assert _rel(x.grad, x32.grad) < 1e-2
    for (s, k), t in masters32.items():
        assert _rel(adapters[s].tensors[k].grad, t.grad) < 2e-2, (s, k)
    handle.remove()
    torch._dynamo.reset()


def test_one_call_captured_in_a_cuda_graph():
    """Forward and backward of the one call captured in a CUDA graph at Flux-dev width (1536
    tokens: 512² training), replayed on new inputs: every output against float32 on the same inputs."""
    torch.manual_seed(0)
    m, r = 1536, 3 * RANK
    weight = torch.randn(N, K, device="cuda").bfloat16() / K**0.5
    bias = torch.randn(N, device="cuda").bfloat16()
    down, up = (
        (torch.randn(K, r, device="cuda") / K**0.5).bfloat16(),
        torch.randn(r, N, device="cuda").bfloat16(),
    )
    x, dy = torch.empty(m, K, device="cuda").bfloat16(), torch.empty(m, N, device="cuda").bfloat16()

    def step():
        y, h = train_gemm.forward(x, weight, bias, down, up)
        return (y, h, *train_gemm.backward(dy, x, weight, h, down, up, True))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        x.normal_(), dy.normal_()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    w32, b32, d32, u32 = (t.float() for t in (weight, bias, down, up))
    for _ in range(3):
        x.normal_(), dy.normal_()
        graph.replay()
        torch.cuda.synchronize()
        x32, dy32 = x.float(), dy.float()
        h32 = x32 @ d32
        g32 = dy32 @ u32.T
        want = (x32 @ w32.T + b32 + h32 @ u32, h32, dy32 @ w32 + g32 @ d32.T, x32.T @ g32, h32.T @ dy32)
        for name, got, ref in zip(("y", "h", "dx", "dD", "dU"), outputs, want, strict=True):
            assert got.shape == ref.shape, name
            assert _rel(got, ref) < 1e-2, name
