"""The training kernels (``runtime.train_kernels``) against float32 autograd and the portable path:
outputs and every gradient, one LoRA per q/k/v slice of a fused projection at Flux-dev width, and a
tiny diffusers Flux in both layouts."""

import pytest
import torch
from torch import nn

import loraplug as lp
from loraplug.runtime import kernels
from loraplug.runtime.bypass import runners

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.trains()), reason="needs CUDA + Triton"
)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    "tokens, masters", [(1536, torch.float32), (300, torch.bfloat16), (4608, torch.float32)]
)
def test_fused_qkv_slices_match_float32_autograd(tokens, masters):
    """to_qkv of Flux-dev width (3072 → 3 × 3072), rank 16 per slice, bias: y, dx, d down, d up."""
    from loraplug.runtime.train_kernels import _PARTIAL, LoraTrainLinear

    g = torch.Generator(device="cuda").manual_seed(0)
    k, n, r = 3072, 3 * 3072, 16
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(tokens, k, device=dev, generator=g).to(bf)
    w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(bf)
    b = torch.randn(n, device=dev, generator=g).to(bf)
    downs = [torch.randn(r, k, device=dev, generator=g) / k**0.5 for _ in range(3)]
    ups = [torch.randn(n // 3, r, device=dev, generator=g) * 0.1 for _ in range(3)]
    scale = torch.tensor([0.5] * r + [1.0] * r + [2.0] * r, device=dev)
    col_rank = torch.arange(3, device=dev, dtype=torch.int32).repeat_interleave(n // 3) * r
    dy = torch.randn(tokens, n, device=dev, generator=g).to(bf)

    down = torch.cat(downs).to(masters).requires_grad_()
    up = torch.cat(ups).to(masters).requires_grad_()
    xk = x.clone().requires_grad_()
    y = LoraTrainLinear.apply(xk, w, b, down, up, col_rank, scale.to(bf))
    y.backward(dy)
    assert len(_PARTIAL.kept) > 0  # the kernels ran

    down32, up32 = down.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    x32 = x.float().requires_grad_()
    ref = x32 @ w.float().T + b.float()
    h = (x32 @ down32.T) * scale
    ref = ref + torch.cat(
        [h[:, i * r : (i + 1) * r] @ up32[i * n // 3 : (i + 1) * n // 3].T for i in range(3)], 1
    )
    ref.backward(dy.float())
    assert _rel(y, ref) < 1e-2
    assert _rel(xk.grad, x32.grad) < 1e-2
    assert down.grad.dtype == masters and up.grad.dtype == masters
    assert _rel(down.grad, down32.grad) < 2e-2
    assert _rel(up.grad, up32.grad) < 2e-2


def _tiny_flux(fused: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 14, 14],
    ).cuda().to(torch.bfloat16)  # fmt: skip
    if fused:
        model.fuse_qkv_projections()
    return model.requires_grad_(False)


@pytest.mark.parametrize("fused", [False, True])
def test_tiny_flux_gradients_as_accurate_as_the_portable_path(fused):
    """Every adapter's gradient in a bf16 tiny Flux, with and without the kernels, against the same
    model in float32 (the portable path): the kernels' error at most the portable path's (+ a
    little; the text stream's gradients here are tiny, bf16 rounds them coarsely either way)."""
    model = _tiny_flux(fused)
    handle = lp.create(model, "lora", rank=8, targets="attn+mlp", init="random")
    params = handle.parameters()
    plain = [m for m in model.modules() if type(m) is nn.Linear and runners(m) is not None]
    assert plain and all(runners(m).trains for m in plain)
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 64, 16, device="cuda", generator=g),
        encoder_hidden_states=torch.randn(1, 24, 64, device="cuda", generator=g),
        pooled_projections=torch.randn(1, 32, device="cuda", generator=g),
        timestep=torch.tensor([0.5], device="cuda"),
        img_ids=torch.zeros(64, 3, device="cuda"), txt_ids=torch.zeros(24, 3, device="cuda"), return_dict=False,
    )  # fmt: skip

    def step(kernels_on: bool, dtype: torch.dtype):
        for m in plain:
            runners(m).trains = kernels_on
        for p in params:
            p.grad = None
        cast = {
            k: v.to(dtype) if torch.is_tensor(v) and k not in ("img_ids", "txt_ids") else v
            for k, v in inputs.items()
        }
        out = model(**cast)[0]
        out.float().pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in params]

    out, grads = step(True, torch.bfloat16)
    portable, portable_grads = step(False, torch.bfloat16)
    model.float()
    ref, ref_grads = step(False, torch.float32)
    assert _rel(out, ref) <= 1.25 * _rel(portable, ref) + 1e-3
    for got, theirs, want in zip(grads, portable_grads, ref_grads, strict=True):
        assert _rel(got, want) <= 1.25 * _rel(theirs, want) + 2e-2
    handle.remove()
