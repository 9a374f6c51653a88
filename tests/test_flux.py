"""A diffusers-format LoRA saved through diffusers+PEFT on a tiny FluxTransformer2DModel, applied by
loraplug to (a) the same model, (b) after fuse_qkv_projections(), (c) the BFL/ComfyUI layout."""

import copy

import pytest
import torch
from conftest import assert_identical, close, randomize_, snapshot
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import loraplug as lp
from loraplug.testing import FINAL_MOD, bfl_layers, flux_inputs, tiny_flux

TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "norm_out.linear",
    "x_embedder",
    "context_embedder",
]


def _diffusers_lora(tmp_path, base, use_dora=False, seed=0, rank=4, alpha=8):
    """Train-free stand-in for a trained LoRA: PEFT adapter with random weights, saved by diffusers."""
    model = copy.deepcopy(base)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora
    )
    model.add_adapter(config)
    randomize_(model, ("lora_A", "lora_B", "lora_magnitude"), std=0.3, seed=seed)
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
        weight_name=f"lora{seed}.safetensors",
    )
    return model, tmp_path / f"lora{seed}.safetensors"


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


@pytest.mark.parametrize("use_dora", [False, True])
def test_diffusers_lora_on_split_and_fused_flux(tmp_path, flux, use_dora):
    peft_model, path = _diffusers_lora(tmp_path, flux, use_dora=use_dora)
    inputs = flux_inputs()
    with torch.no_grad():
        want = peft_model(**inputs)[0]
        plain = flux(**inputs)[0]
    adapters = lp.load(path)
    assert adapters.format == "peft" and set(adapters.algorithms) == {"lora"}
    n_keys = len(adapters)

    for fused in (False, True):
        model = copy.deepcopy(flux)
        if fused:
            model.fuse_qkv_projections()
        snap = snapshot(model)
        for mode in ("bypass", "merge"):
            handle = lp.apply(model, adapters, mode=mode)
            report = handle.report
            assert report.ok and len(report.matched) == n_keys
            if fused:
                assert all(
                    t.module.endswith(("to_qkv", "to_added_qkv"))
                    for k, ts in report.matched.items()
                    if k.endswith(("to_q", "add_k_proj"))
                    for t in ts
                )
                assert len(report.fused) == 6 * 2 + 3 * 2
            with torch.no_grad():
                got = model(**inputs)[0]
            close(got, want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, plain, atol=1e-3)
            handle.remove()
            assert_identical(model, snap)


def test_bfl_layout_module_by_module(tmp_path, flux):
    peft_model, path = _diffusers_lora(tmp_path, flux)
    bfl, sources = bfl_layers(flux)
    snap = snapshot(bfl)
    handle = lp.apply(bfl, path)
    assert handle.report.ok
    linear1 = [k for k, ts in handle.report.matched.items() if ts[0].module == "single_blocks.0.linear1"]
    assert len(linear1) == 4  # q, k, v and proj_mlp share the fused linear1
    peft_modules = dict(peft_model.named_modules())
    bfl_modules = dict(bfl.named_modules())
    x = torch.randn(3, 256)
    for path_, parts in sources.items():
        layer = bfl_modules[path_]
        xin = x[:, : layer.in_features]
        with torch.no_grad():
            want = torch.cat([peft_modules[p](xin) for p in parts], dim=-1)
            if path_ == FINAL_MOD:  # BFL (shift, scale) vs diffusers (scale, shift)
                want = want.roll(want.shape[-1] // 2, -1)
            got = layer(xin)
        close(got, want, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert_identical(bfl, snap)


def test_two_loras_stack_on_fused_flux(tmp_path, flux):
    _, path_a = _diffusers_lora(tmp_path, flux, seed=1)
    _, path_b = _diffusers_lora(tmp_path, flux, seed=2, rank=2, alpha=1)
    model = copy.deepcopy(flux)
    model.fuse_qkv_projections()
    inputs = flux_inputs()
    merged = copy.deepcopy(model)
    lp.merge(merged, [path_a, path_b], strength=[0.7, 1.3])
    with torch.no_grad():
        want = merged(**inputs)[0]
    handle_a = lp.apply(model, path_a, strength=0.7)
    handle_b = lp.apply(model, path_b, strength=1.3)
    with torch.no_grad():
        got = model(**inputs)[0]
    close(got, want, rtol=1e-4, atol=1e-5)
    handle_a.remove()
    handle_b.remove()
