"""Flux.2 and Z-Image layouts checked against diffusers' own single-file converters: a checkpoint
written in the original layout by loraplug's tables converts back to the diffusers weights exactly,
and keys named either way resolve on both layouts."""

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from torch import nn

import loraplug as lp
from loraplug.arch import ModelIndex
from loraplug.arch.flux2 import flux2_groups
from loraplug.arch.zimage import zimage_groups
from loraplug.skeleton import from_shapes


def original_checkpoint(model, groups):
    """Every Linear of the model written in the other layout: groups fused (halves swapped where
    the layouts differ so), the modules both layouts name alike as they are."""
    modules = dict(model.named_modules())
    grouped = {p for g in groups for p in g.parts}
    sd = {
        f"{n}.weight": m.weight.detach()
        for n, m in modules.items()
        if isinstance(m, nn.Linear) and n not in grouped
    }
    for g in groups:
        parts = [modules.get(p) for p in g.parts]
        if not all(isinstance(p, nn.Linear) for p in parts):
            continue
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
        if g.swap:
            weight = weight.roll(weight.shape[0] // 2, 0)
            bias = None if bias is None else bias.roll(bias.shape[0] // 2)
        sd[g.other + ".weight"] = weight
        if bias is not None:
            sd[g.other + ".bias"] = bias
    return sd


def _models():
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel

    torch.manual_seed(0)
    flux2 = Flux2Transformer2DModel(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 2, 2))  # fmt: skip
    zimage = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                      cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])  # fmt: skip
    return {
        "flux2": (
            flux2,
            lambda ops: flux2_groups("", ops),
            sfu.convert_flux2_transformer_checkpoint_to_diffusers,
        ),
        "zimage": (zimage, zimage_groups, sfu.convert_z_image_transformer_checkpoint_to_diffusers),
    }


@pytest.mark.parametrize("name", ["flux2", "zimage"])
def test_layout_inverts_the_diffusers_converter(name):
    model, groups_of, convert = _models()[name]
    index = ModelIndex(model)
    checkpoint = original_checkpoint(model, groups_of(index.ops))
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    converted = convert(dict(checkpoint))
    state = model.state_dict()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    covered = {k for k in converted if k in linear}
    assert linear - covered == set(), sorted(linear - covered)[:5]
    for key in covered:
        assert torch.equal(converted[key], state[key]), key
    # names both ways: diffusers LoRA keys on the original layout, original keys on diffusers
    original = from_shapes(shapes)
    diffusers_keys = {
        f"transformer.{k.removesuffix('.weight')}.lora_A.weight": torch.zeros(1, 1) for k in linear
    }
    other_keys = {f"lora_unet_{k.removesuffix('.weight').replace('.', '_')}.lora_down.weight": torch.zeros(1, 1)
                  for k in shapes if k.endswith(".weight")}  # fmt: skip
    for keys, layout in ((diffusers_keys, original), (other_keys, model)):
        adapters = lp.load({**keys, **{k.replace("lora_A", "lora_B").replace("lora_down", "lora_up"): v
                                       for k, v in keys.items()}})  # fmt: skip
        plan = ModelIndex(layout).resolve(adapters)
        assert not plan.unmatched, list(plan.unmatched)[:5]


def test_zimage_modulation_index_of_comfyui():
    """ComfyUI's NextDiT names each block's modulation Linear adaLN_modulation.1 (after a SiLU);
    Z-Image checkpoints and diffusers say .0: keys of either kind land on either model."""
    model, groups_of, _ = _models()["zimage"]
    index = ModelIndex(model)
    checkpoint = original_checkpoint(model, groups_of(index.ops))
    blocks = [k for k in checkpoint if ".adaLN_modulation.0." in k and "final_layer" not in k]
    assert blocks
    comfy_shapes = {
        k.replace(".adaLN_modulation.0.", ".adaLN_modulation.1."): tuple(v.shape)
        for k, v in checkpoint.items()
    }
    comfy = from_shapes(comfy_shapes)
    for layout, index_in_key, want in ((comfy, 0, 1), (model, 1, 0)):
        sd = {}
        for k in blocks:
            name = k.removesuffix(".weight").replace(
                ".adaLN_modulation.0", f".adaLN_modulation.{index_in_key}"
            )
            sd[f"diffusion_model.{name}.lora_down.weight"] = torch.zeros(1, 1)
            sd[f"diffusion_model.{name}.lora_up.weight"] = torch.zeros(1, 1)
        plan = ModelIndex(layout).resolve(lp.load(sd))
        assert not plan.unmatched, list(plan.unmatched)[:5]
        landed = {t.module for ts in plan.matched.values() for t in ts}
        assert landed and all(m.endswith(f"adaLN_modulation.{want}") for m in landed), sorted(landed)[:3]
