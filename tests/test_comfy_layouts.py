"""ComfyUI's key maps as the oracle for other layouts (SD3 ``joint_blocks``, ldm UNets): the other
layout is rebuilt from a tiny diffusers model by ComfyUI's own map, then adapters named either way
must land on the same slices and give the same outputs on both layouts."""

import copy

import pytest
import torch
from conftest import close
from torch import nn

import loraplug as lp
from loraplug.arch import ModelIndex

LAYERS = (nn.Linear, nn.Conv2d)


def other_layout(model, key_map):
    """(tree in the other layout, {other module: (diffusers parts in output order, swapped)})."""
    modules = dict(model.named_modules())
    groups: dict[str, list] = {}
    for key, value in key_map.items():
        name = key.removesuffix(".weight")
        if not key.endswith(".weight") or not isinstance(modules.get(name), LAYERS):
            continue
        other, sl, fn = (value, None, None) if isinstance(value, str) else (*value, None)[:3]
        groups.setdefault(other.removesuffix(".weight"), []).append(
            (sl[1] if sl else 0, name, fn is not None)
        )
    root, sources = nn.Module(), {}
    for other, parts in groups.items():
        parts.sort()
        layers = [modules[n] for _, n, _ in parts]
        layer = copy.deepcopy(layers[0])
        swap = parts[0][2]
        with torch.no_grad():
            if len(layers) > 1 or swap:
                weight = torch.cat([m.weight for m in layers])
                bias = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
                if swap:
                    weight, bias = weight.roll(weight.shape[0] // 2, 0), bias.roll(bias.shape[0] // 2)
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
        node = root
        *parents, leaf = other.split(".")
        for p in parents:
            if p not in node._modules:
                node.add_module(p, nn.Module())
            node = node._modules[p]
        node.add_module(leaf, layer)
        sources[other] = ([n for _, n, _ in parts], swap)
    return root, sources


def _input(layer, g):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(1, layer.in_channels, 6, 6, generator=g)
    return torch.randn(2, layer.in_features, generator=g)


def _lora_for(layer, g, rank=2):
    if isinstance(layer, nn.Conv2d):
        return (torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g) * 0.3,
                torch.randn(layer.out_channels, rank, 1, 1, generator=g) * 0.3)  # fmt: skip
    return torch.randn(rank, layer.in_features, generator=g) * 0.3, torch.randn(
        layer.out_features, rank, generator=g
    ) * 0.3


def check_layout(model, key_map):
    other, sources = other_layout(model, key_map)
    modules, others = dict(model.named_modules()), dict(other.named_modules())
    g = torch.Generator().manual_seed(0)
    # 1. names: every diffusers part lands where ComfyUI puts it, and every other name spreads back
    index, reverse = ModelIndex(other), ModelIndex(model)
    for name, (parts, swap) in sources.items():
        targets, reason = reverse.lookup(name)
        assert targets is not None, (name, reason)
        if len(parts) > 1:
            assert [t.module for t in targets] == parts, name
        else:
            assert [t.module for t in targets] == parts * (2 if swap else 1), name
        for part in parts:
            assert index.lookup(part)[0] is not None, part
    # 2. numbers: a LoRA named either way gives the same outputs on both layouts
    diffusers_sd, other_sd = {}, {}
    for name, (parts, _) in sources.items():
        for part in parts:
            down, up = _lora_for(modules[part], g)
            (
                diffusers_sd[f"transformer.{part}.lora_A.weight"],
                diffusers_sd[f"transformer.{part}.lora_B.weight"],
            ) = down, up
        down, up = _lora_for(others[name], g)
        other_sd[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = down
        other_sd[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = up
    inputs = {name: _input(others[name], g) for name in sources}
    for sd in (diffusers_sd, other_sd):
        with lp.apply(model, sd), lp.apply(other, sd), torch.no_grad():
            for name, (parts, swap) in sources.items():
                x = inputs[name]
                want = torch.cat([modules[p](x) for p in parts], 1 if x.dim() == 4 else -1)
                if swap:
                    want = want.roll(want.shape[-1] // 2, -1)
                close(others[name](x), want, rtol=1e-5, atol=1e-5)
    return len(sources)


def test_sd3_joint_blocks(comfy_utils):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=128,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
                                  dual_attention_layers=(0,))  # fmt: skip
    key_map = comfy_utils.mmdit_to_diffusers({"depth": 2, "num_blocks": 2}, output_prefix="")
    assert check_layout(model, key_map) > 20


def test_sd3_counts_are_not_vacuous(comfy_utils):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=128,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
                                  dual_attention_layers=(0,))  # fmt: skip
    key_map = comfy_utils.mmdit_to_diffusers({"depth": 2, "num_blocks": 2}, output_prefix="")
    _, sources = other_layout(model, key_map)
    fused = [n for n, (parts, _) in sources.items() if len(parts) == 3]
    swapped = [n for n, (_, swap) in sources.items() if swap]
    assert len(fused) == 5  # x/context qkv of both blocks, attn2 qkv of block 0
    assert sorted(swapped) == [
        "final_layer.adaLN_modulation.1",
        "joint_blocks.1.context_block.adaLN_modulation.1",
    ]
    model.fuse_qkv_projections()
    targets, _ = ModelIndex(model).lookup("lora_unet_joint_blocks_0_x_block_attn_qkv")
    assert [str(t) for t in targets] == ["transformer_blocks.0.attn.to_qkv"]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_ldm_layout(comfy_utils, kind):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=16,
                  norm_num_groups=4, attention_head_dim=2)  # fmt: skip
    if kind == "sd15":
        model = UNet2DConditionModel(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common)  # fmt: skip
        config = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
                  "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1}  # fmt: skip
    else:  # SDXL-like: no attention at the top level, two transformer blocks deeper, added embeddings
        common["layers_per_block"] = 2
        model = UNet2DConditionModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                                     addition_embed_type="text_time", addition_time_embed_dim=4,
                                     projection_class_embeddings_input_dim=28, use_linear_projection=True, **common)  # fmt: skip
        config = {"num_res_blocks": [2, 2], "channel_mult": [1, 2], "transformer_depth": [0, 0, 2, 2],
                  "transformer_depth_output": [0, 0, 0, 2, 2, 2], "transformer_depth_middle": 2}  # fmt: skip
    key_map = comfy_utils.unet_to_diffusers(config)
    assert check_layout(model, key_map) > 30


def test_real_size_sdxl_kohya_keys_on_diffusers_unet(comfy_utils):
    """Every Linear/Conv of an SDXL-size UNet (meta device), named the ldm way as kohya SDXL LoRAs
    name them, resolves onto the diffusers UNet with zero unmatched keys."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
    config = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}  # fmt: skip
    key_map = comfy_utils.unet_to_diffusers(config)
    layers = {n for n, m in model.named_modules() if isinstance(m, LAYERS)}
    ldm = {
        v.removesuffix(".weight") for k, v in key_map.items() if k.endswith(".weight") and k[:-7] in layers
    }
    assert len(ldm) > 700
    keys = {
        f"lora_unet_{n.replace('.', '_')}.{w}" for n in ldm for w in ("lora_down.weight", "lora_up.weight")
    }
    plan = ModelIndex(model).resolve(lp.load({k: torch.zeros(1, 1) for k in keys}))
    assert not plan.unmatched and len(plan.matched) == len(ldm)


def test_real_size_sd35_medium_both_ways(comfy_utils):
    """SD3.5-medium size on the meta device: the original joint_blocks names (kohya) resolve onto
    the diffusers model, and diffusers names onto a joint_blocks skeleton, with zero unmatched."""
    from diffusers import SD3Transformer2DModel

    from loraplug.skeleton import from_shapes

    with torch.device("meta"):
        model = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        )  # fmt: skip
    key_map = comfy_utils.mmdit_to_diffusers({"depth": 24, "num_blocks": 24}, output_prefix="")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LAYERS)}
    shapes = {}
    for key, value in key_map.items():
        if key.endswith(".weight") and key[:-7] in layers:
            other = (value if isinstance(value, str) else value[0]).removesuffix(".weight")
            w = layers[key[:-7]].weight
            prev = shapes.get(other + ".weight")
            shapes[other + ".weight"] = (w.shape[0] + (prev[0] if prev else 0), *w.shape[1:])
    for names, layout in (({k[:-7] for k in shapes}, model), (set(layers), from_shapes(shapes))):
        keys = {f"lora_unet_{n.replace('.', '_')}.{w}" if layout is model else f"transformer.{n}.{w2}": torch.zeros(1, 1)
                for n in names for w, w2 in (("lora_down.weight", "lora_A.weight"), ("lora_up.weight", "lora_B.weight"))}  # fmt: skip
        plan = ModelIndex(layout).resolve(lp.load(keys))
        assert not plan.unmatched, list(plan.unmatched)[:5]
        assert len(plan.matched) == len(names) > 250
