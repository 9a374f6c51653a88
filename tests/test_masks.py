"""Region masks: output == base + Σ maskᵢ·sᵢ·hᵢ exactly, on fused and split modules, conv maps,
a tiny Flux (all ones == no mask, zeros == absent, disjoint regions), mixed batches, and no
recompilation when a mask changes."""

import copy

import pytest
import torch
from conftest import close
from torch import nn

import loraplug as lp
from loraplug.demo import diffusers_lora_file
from loraplug.testing import flux_inputs, tiny_flux


def _lora(names_sizes, in_dim, seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, size in names_sizes:
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(size, rank, generator=g)
    return sd


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.to_qkv = nn.Linear(8, 24)
        self.fused_projections = True


@pytest.mark.parametrize("dora", [False, True])
def test_module_level_masked_sum_is_exact(dora):
    torch.manual_seed(0)
    model = Attn()
    a = _lora([("to_q", 8), ("to_k", 8), ("to_v", 8)], 8, seed=1)
    b = _lora([("to_k", 8)], 8, seed=2)
    if dora:  # a DoRA entry sends the module down the general path
        b["to_k.lora_magnitude_vector"] = torch.rand(8) + 0.5
    x = torch.randn(2, 5, 8)
    ma, mb = torch.rand(2, 5), torch.rand(2, 5)
    with torch.no_grad():
        base = model.to_qkv(x)
        deltas = []
        for sd, s in ((a, 0.7), (b, 1.3)):
            with lp.apply(model, sd, strength=s):
                deltas.append(model.to_qkv(x) - base)
        with lp.apply(model, [a, b], strength=[0.7, 1.3]) as handle:
            handle.set_mask([ma, mb], tokens=True)
            got = model.to_qkv(x)
    want = base + ma[..., None] * deltas[0] + mb[..., None] * deltas[1]
    close(got, want, rtol=1e-6, atol=1e-6)


def test_conv_feature_maps_get_the_mask_at_their_resolution():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2))
    sd = {"0.lora_down.weight": torch.randn(2, 3, 3, 3), "0.lora_up.weight": torch.randn(4, 2, 1, 1)}
    x = torch.randn(1, 3, 16, 16)
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1.0  # left half, at twice the output's resolution
    with torch.no_grad():
        base = conv(x)
        with lp.apply(conv, sd):
            full = conv(x)
        with lp.apply(conv, sd) as handle:
            handle.set_mask(mask)
            got = conv(x)
    close(got[..., :4], full[..., :4])
    close(got[..., 4:], base[..., 4:])


@pytest.fixture(scope="module")
def flux_and_loras(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    flux = tiny_flux()
    a = lp.load(diffusers_lora_file(flux, tmp / "a.safetensors", rank=4, alpha=4.0, seed=1))
    b = lp.load(diffusers_lora_file(flux, tmp / "b.safetensors", rank=4, alpha=4.0, seed=2))
    return flux, a, b


def test_flux_all_ones_zero_and_disjoint_masks(flux_and_loras):
    flux, a, b = flux_and_loras
    model = copy.deepcopy(flux)
    model.fuse_qkv_projections()
    inputs = flux_inputs(image_tokens=16)
    with torch.no_grad():
        base = model(**inputs)[0]
        with lp.apply(model, a):
            only_a = model(**inputs)[0]
        with lp.apply(model, b):
            only_b = model(**inputs)[0]
        with lp.apply(model, a) as handle:
            handle.set_mask(torch.ones(64, 64))
            close(model(**inputs)[0], only_a, rtol=1e-5, atol=1e-5)
            handle.set_mask(torch.zeros(64, 64), text_value=0.0)
            close(model(**inputs)[0], base, rtol=1e-5, atol=1e-5)
        left = torch.zeros(64, 64)
        left[:, :32] = 1.0
        with lp.apply(model, [a, b]) as handle:
            handle.set_mask([left, 1 - left])
            both = model(**inputs)[0]
    image = both.reshape(4, 4, -1)  # 16 image tokens on a 4×4 grid
    for region, own, other in ((slice(0, 2), only_a, only_b), (slice(2, 4), only_b, only_a)):
        mine = image[:, region]
        own_r, other_r = own.reshape(4, 4, -1)[:, region], other.reshape(4, 4, -1)[:, region]
        assert (mine - own_r).norm() < (mine - other_r).norm()


def test_mixed_batch_per_sample_masks(flux_and_loras):
    flux, a, _ = flux_and_loras
    model = copy.deepcopy(flux)
    inputs = flux_inputs(batch=2, image_tokens=16)
    with torch.no_grad():
        base = model(**inputs)[0]
        with lp.apply(model, a):
            full = model(**inputs)[0]
        with lp.apply(model, a) as handle:
            handle.set_mask(torch.tensor([[1.0], [0.0]]), tokens=True)  # (B, 1): on for sample 0 only
            got = model(**inputs)[0]
    close(got[0], full[0], rtol=1e-5, atol=1e-5)
    close(got[1], base[1], rtol=1e-5, atol=1e-5)


def test_changing_a_mask_does_not_recompile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    handle = lp.apply(model, _lora([("0", 8)], 8, seed=3))
    x = torch.randn(2, 5, 8)
    handle.set_mask(torch.ones(2, 5), tokens=True)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(x)
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(10):
                mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(i))
                handle.set_mask(mask, tokens=True)
                got = compiled(x)
                handle.set_mask(None)
                plain = model(x)
                handle.set_mask(torch.zeros(2, 5), tokens=True)
                base = model(x)
                close(got, base + mask[..., None] * (plain - base), rtol=1e-5, atol=1e-5)
                handle.set_mask(mask, tokens=True)
    handle.remove()
