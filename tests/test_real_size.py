"""Real-size key coverage without weights: the Flux-dev transformer on the meta device, every key
of every convention mapped onto every layout with zero unmatched keys."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

import loraplug as lp
from loraplug.arch import ModelIndex
from loraplug.testing import bfl_layers

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
ONE = torch.zeros(1, 1)


@pytest.fixture(scope="module")
def layouts():
    with torch.device("meta"):
        split = FluxTransformer2DModel(**FLUX_DEV)
    fused = copy.deepcopy(split)
    fused.fuse_qkv_projections()
    bfl, _ = bfl_layers(split)
    return {"diffusers": split, "diffusers-fused": fused, "bfl": bfl}


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _key_sets(layouts):
    split, bfl = layouts["diffusers"], layouts["bfl"]
    diffusers_names = [n for n in _linear_names(split) if ".to_qkv" not in n and "added_qkv" not in n]
    bfl_names = _linear_names(bfl)
    return {
        "diffusers (ai-toolkit, PEFT)": {f"transformer.{n}.lora_A.weight" for n in diffusers_names}
        | {f"transformer.{n}.lora_B.weight" for n in diffusers_names},
        "kohya (BFL names)": {f"lora_unet_{n.replace('.', '_')}.{w}" for n in bfl_names
                              for w in ("lora_down.weight", "lora_up.weight", "alpha")},
        "comfy": {f"diffusion_model.{n}.{w}" for n in bfl_names for w in ("lora_A.weight", "lora_B.weight")},
        "kohya (diffusers names)": {f"lora_transformer_{n.replace('.', '_')}.{w}" for n in diffusers_names
                                    for w in ("lora_down.weight", "lora_up.weight")},
        "xlabs": {f"double_blocks.{i}.processor.{p}.{w}.weight" for i in range(19)
                  for p in ("qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2") for w in ("down", "up")}
        | {f"single_blocks.{i}.processor.{p}.{w}.weight" for i in range(38)
           for p in ("qkv_lora", "proj_lora") for w in ("down", "up")},
    }  # fmt: skip


def test_every_convention_maps_onto_every_layout(layouts):
    indexes = {name: ModelIndex(model) for name, model in layouts.items()}
    for convention, keys in _key_sets(layouts).items():
        adapters = lp.load({k: ONE for k in keys})
        assert not adapters.unknown_keys, convention
        for layout, index in indexes.items():
            plan = index.resolve(adapters)
            assert not plan.unmatched, (convention, layout, list(plan.unmatched.items())[:3])
            assert len(plan.matched) == len(adapters)


def test_real_size_slices(layouts):
    index = ModelIndex(layouts["bfl"])
    targets, _ = index.lookup("transformer.single_transformer_blocks.37.proj_mlp")
    assert [str(t) for t in targets] == ["single_blocks.37.linear1[9216:21504]"]
    index = ModelIndex(layouts["diffusers-fused"])
    targets, _ = index.lookup("transformer.transformer_blocks.18.attn.to_v")
    assert [str(t) for t in targets] == ["transformer_blocks.18.attn.to_qkv[6144:9216]"]
