"""A diffusers-format LoRA saved through diffusers+PEFT on a tiny FluxTransformer2DModel, applied by
loraplug to (a) the same model, (b) after fuse_qkv_projections(), (c) the BFL/ComfyUI layout."""

import copy

import pytest
import torch
from conftest import assert_identical, close, randomize_, snapshot
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

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


def _split_layers(model):
    """(attention, fused name, split layers) for every fusion diffusers made."""
    return [
        (attn, fused, [getattr(attn, p) for p in parts])
        for attn in model.modules()
        if getattr(attn, "fused_projections", False)
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
        if hasattr(attn, fused)
    ]  # fmt: skip


def _storage_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def _shares(attn, fused, layers) -> bool:
    whole = getattr(attn, fused)
    return all(
        layer.weight.untyped_storage().data_ptr() == whole.weight.untyped_storage().data_ptr()
        and layer.bias.untyped_storage().data_ptr() == whole.bias.untyped_storage().data_ptr()
        for layer in layers
    )


def test_share_fused_weights_keeps_one_copy(tmp_path, flux):
    """After fuse_qkv_projections() the split q/k/v weights become views of the fused ones: the
    bytes held twice are released, values and outputs stay, LoRAs apply and remove exactly, and
    unfuse_qkv_projections() still gives the split model."""
    peft_model, path = _diffusers_lora(tmp_path, flux)
    inputs = flux_inputs()
    with torch.no_grad():
        plain, want = flux(**inputs)[0], peft_model(**inputs)[0]
    model = copy.deepcopy(flux)
    model.fuse_qkv_projections()
    snap, before = snapshot(model), _storage_bytes(model)
    split = _split_layers(model)
    assert len(split) == 2 * 2 + 2  # two double blocks (image and text streams), two single blocks
    twice = sum(
        t.numel() * t.element_size()
        for _, _, layers in split
        for layer in layers
        for t in (layer.weight, layer.bias)
    )

    assert lp.share_fused_weights(model) == twice
    assert _storage_bytes(model) == before - twice
    assert all(_shares(*s) for s in split)
    assert_identical(model, snap)
    assert lp.share_fused_weights(model) == 0
    for mode in ("bypass", "merge"):
        handle = lp.apply(model, path, mode=mode)
        assert handle.report.ok
        with torch.no_grad():
            close(model(**inputs)[0], want, rtol=1e-5, atol=1e-5)
        handle.remove()
        assert_identical(model, snap)
    model.unfuse_qkv_projections()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], plain, rtol=0, atol=0)
    save_file(
        {k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "split.safetensors"
    )  # as documented
    saved, state = load_file(tmp_path / "split.safetensors"), model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items())


def test_share_fused_weights_leaves_what_does_not_qualify(flux):
    """A split layer changed after fusing, of another dtype, or without the fused layer's bias keeps
    its fusion's own copies; the other fusions are shared; an unfused model is left as it is."""
    assert lp.share_fused_weights(copy.deepcopy(flux)) == 0
    model = copy.deepcopy(flux)
    model.fuse_qkv_projections()
    split = _split_layers(model)
    changed, other_dtype, no_bias, *rest = split
    with torch.no_grad():
        changed[2][1].weight[0, 0] += 1.0
    other_dtype[2][0].to(torch.float64)
    no_bias[2][1].bias = None  # the fused layer has one
    freed = lp.share_fused_weights(model)
    assert freed == sum(
        t.numel() * t.element_size()
        for _, _, layers in rest
        for layer in layers
        for t in (layer.weight, layer.bias)
    )
    assert not _shares(*changed) and not _shares(*other_dtype)
    assert (
        no_bias[2][0].weight.untyped_storage().data_ptr()
        != getattr(no_bias[0], no_bias[1]).weight.untyped_storage().data_ptr()
    )
    assert all(_shares(*s) for s in rest)


def test_share_fused_weights_on_cross_attention():
    """diffusers' cross-attention fuses k/v into ``to_kv``: shared the same way, output unchanged."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, bias=True)
    attn.fuse_projections()
    x, context = torch.randn(1, 5, 32), torch.randn(1, 7, 24)
    with torch.no_grad():
        want = attn(x, context)
    kv_bytes = sum(t.numel() * t.element_size() for m in (attn.to_k, attn.to_v) for t in (m.weight, m.bias))
    assert lp.share_fused_weights(attn) == kv_bytes
    assert _shares(attn, "to_kv", [attn.to_k, attn.to_v])
    with torch.no_grad():
        assert torch.equal(attn(x, context), want)
