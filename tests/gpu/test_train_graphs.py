"""Training under torch.compile on CUDA: CUDA graphs (``compile="reduce-overhead"``) with gradient
accumulation train the same adapters as eager mode, and an fp8 base trains in one graph."""

import pytest
import torch

import loraplug as lp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _train(compile, grad_accum: int, fp8: bool = False) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    model = model.cuda().to(torch.bfloat16)
    if fp8:
        lp.quantize_fp8(model)
    handle = lp.create(model, "lora", rank=8, targets="all-linear", init="gaussian")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)) for _ in range(4)]
    data = [(a.cuda().to(torch.bfloat16), b.cuda().to(torch.bfloat16)) for a, b in data]

    def loss_fn(batch):
        return torch.nn.functional.mse_loss(model(batch[0]).float(), batch[1].float())

    # SGD: an update proportional to the gradient (AdamW's sign-like first steps turned bf16 noise
    # in near-zero gradients into differences of ±lr: 4 of 512 elements on the H200)
    result = lp.train(handle, data, loss_fn, steps=3, lr=1e-1, optimizer="sgd", grad_accum=grad_accum,
                      progress=False, compile=compile)  # fmt: skip
    return result.losses, [p.detach().clone() for p in handle.parameters()]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_cuda_graphs_train_like_eager(grad_accum):
    torch._dynamo.reset()
    eager_losses, eager_params = _train(False, grad_accum)
    losses, params = _train("reduce-overhead", grad_accum)
    torch._dynamo.reset()
    assert losses == pytest.approx(eager_losses, rel=2e-2)
    for got, want in zip(params, eager_params, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_fp8_base_trains_compiled_in_one_graph():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmul needs sm_89+")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_losses, _ = _train(False, 1, fp8=True)
    losses, _ = _train(True, 1, fp8=True)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch._dynamo.reset()
    assert losses == pytest.approx(eager_losses, rel=2e-2)
