"""Every Flux key convention on every Flux layout: BFL/ComfyUI (fused), diffusers split, diffusers
after fuse_qkv_projections(). A LoRA trained on fused modules spreads its rows over split ones."""

import copy

import pytest
import torch
from conftest import close

import loraplug as lp
from loraplug.testing import FINAL_MOD, bfl_layers, tiny_flux

QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADDED = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


def _fused_sources(sources):
    """The same BFL view on a fused diffusers model: q/k/v triples read from to_qkv / to_added_qkv."""
    out = {}
    for path, names in sources.items():
        names = list(names)
        for triple, fused in ((QKV, "attn.to_qkv"), (ADDED, "attn.to_added_qkv")):
            full = [n for n in names if n.endswith(triple)]
            if len(full) == 3:
                prefix = full[0][: -len(triple[0])]
                i = names.index(full[0])
                names[i : i + 3] = [prefix + fused]
        out[path] = tuple(names)
    return out


def _bfl_view(model, sources, x):
    modules = dict(model.named_modules())
    view = {}
    with torch.no_grad():
        for path, names in sources.items():
            first = modules[names[0]]
            y = torch.cat([modules[n](x[:, : first.in_features]) for n in names], -1)
            view[path] = y.roll(y.shape[-1] // 2, -1) if path == FINAL_MOD else y
    return view


def _outputs(module_root, x):
    with torch.no_grad():
        return {
            p: m(x[:, : m.in_features])
            for p, m in module_root.named_modules()
            if isinstance(m, torch.nn.Linear)
        }


def _kohya_lora(bfl, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, m in bfl.named_modules():
        if isinstance(m, torch.nn.Linear):
            key = "lora_unet_" + path.replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
            sd[key + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
            sd[key + ".alpha"] = torch.tensor(2.0)
    return sd


def _xlabs_lora(bfl, rank=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd, modules = {}, dict(bfl.named_modules())
    names = {
        "img_attn.qkv": "qkv_lora1",
        "txt_attn.qkv": "qkv_lora2",
        "img_attn.proj": "proj_lora1",
        "txt_attn.proj": "proj_lora2",
        "linear2": "proj_lora",
    }
    for path, m in modules.items():
        block, _, rest = path.partition(".")[2].partition(".")
        kind = path.split(".")[0]
        src = names.get(rest) if kind == "double_blocks" or rest == "linear2" else None
        width = m.out_features if isinstance(m, torch.nn.Linear) else 0
        if kind == "single_blocks" and rest == "linear1":
            src, width = "qkv_lora", modules[f"single_blocks.{block}.linear2"].out_features * 3
        if src:
            key = f"{kind}.{block}.processor.{src}"
            sd[key + ".down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
            sd[key + ".up.weight"] = torch.randn(width, rank, generator=g) * 0.3
    return sd


@pytest.mark.parametrize("convention", ["kohya", "xlabs"])
def test_bfl_named_lora_on_every_layout(flux, convention):
    bfl, sources = bfl_layers(flux)
    sd = _kohya_lora(bfl) if convention == "kohya" else _xlabs_lora(bfl)
    adapters = lp.load(sd)
    assert adapters.format == convention
    x = torch.randn(3, 256)
    plain = _outputs(bfl, x)
    with lp.apply(bfl, adapters) as handle:
        assert handle.report.ok
        want = _outputs(bfl, x)
    moved = [p for p in want if not torch.allclose(want[p], plain[p])]
    assert len(moved) == (len(want) if convention == "kohya" else 2 * 4 + 2 * 2)
    for fused in (False, True):
        model = copy.deepcopy(flux)
        if fused:
            model.fuse_qkv_projections()
        view_sources = _fused_sources(sources) if fused else sources
        for mode in ("bypass", "merge"):
            with lp.apply(model, adapters, mode=mode) as handle:
                report = handle.report
                assert report.ok, report.unmatched
                got = _bfl_view(model, view_sources, x)
            for path in want:
                close(got[path], want[path], rtol=1e-5, atol=1e-5)
        if not fused and convention == "kohya":
            spread = [str(t) for t in report.matched["lora_unet_single_blocks_0_linear1"]]
            assert spread == [
                "single_transformer_blocks.0.attn.to_q <- rows 0:16",
                "single_transformer_blocks.0.attn.to_k <- rows 16:32",
                "single_transformer_blocks.0.attn.to_v <- rows 32:48",
                "single_transformer_blocks.0.proj_mlp <- rows 48:112",
            ]


def test_final_modulation_halves_are_swapped(flux):
    bfl, _ = bfl_layers(flux)
    g = torch.Generator().manual_seed(0)
    up = torch.randn(32, 2, generator=g)
    sd = {
        "transformer.norm_out.linear.lora_A.weight": torch.randn(2, 16, generator=g),
        "transformer.norm_out.linear.lora_B.weight": up,
    }
    with lp.apply(bfl, sd) as handle:
        targets = [str(t) for t in handle.report.matched["transformer.norm_out.linear"]]
    assert targets == [
        "final_layer.adaLN_modulation.1[16:32] <- rows 0:16",
        "final_layer.adaLN_modulation.1[0:16] <- rows 16:32",
    ]


def test_a_loha_spanning_split_modules_is_cut_and_a_lokr_is_refused(flux):
    bfl, _ = bfl_layers(flux)
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    loha = {
        f"{key}.hada_w{i}_{ab}": torch.randn(*((48, 2) if ab == "a" else (2, 16)), generator=g) * 0.3
        for i in "12"
        for ab in "ab"
    }
    x = torch.randn(3, 16)
    with lp.apply(bfl, loha):
        want = getattr(bfl.double_blocks, "0").img_attn.qkv(x)
    model = copy.deepcopy(flux)
    with lp.apply(model, loha), torch.no_grad():
        attn = model.transformer_blocks[0].attn
        close(torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1), want, rtol=1e-5, atol=1e-5)
    lokr = {f"{key}.lokr_w1": torch.randn(4, 4), f"{key}.lokr_w2": torch.randn(12, 4)}
    with pytest.raises(lp.UnsupportedModuleError, match="cannot\nbe cut|cannot be cut"):
        lp.apply(copy.deepcopy(flux), lokr)


def test_text_encoder_keys_go_to_the_text_encoder(flux):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50, max_position_embeddings=8))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 16, generator=g),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(48, 2, generator=g),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 16, generator=g),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(16, 2, generator=g)}  # fmt: skip
    model = copy.deepcopy(flux)
    with pytest.warns(UserWarning, match="text_encoder"):
        handle = lp.apply(model, sd)
    assert list(handle.report.other_components) == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    assert "for other components" in str(handle.report)
    handle.remove()
    with lp.apply(te, sd, strict=False) as te_handle:
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te_handle.report.matched
        assert list(te_handle.report.unmatched) == ["lora_unet_double_blocks_0_img_attn_qkv"]


def test_kohya_flattening_is_resolved_against_real_names_or_reported_ambiguous():
    root = torch.nn.Module()
    root.a_b = torch.nn.Module()
    root.a_b.c = torch.nn.Linear(2, 2)
    root.a = torch.nn.Module()
    root.a.b_c = torch.nn.Linear(2, 2)
    root.a.b_d = torch.nn.Linear(2, 2)
    sd = {f"lora_unet_{k}.{w}": torch.zeros(1, 2) if w.endswith("down.weight") else torch.zeros(2, 1)
          for k in ("a_b_c", "a_b_d") for w in ("lora_down.weight", "lora_up.weight")}  # fmt: skip
    handle = lp.apply(root, sd, strict=False)
    assert [str(t) for t in handle.report.matched["lora_unet_a_b_d"]] == ["a.b_d"]
    assert handle.report.unmatched["lora_unet_a_b_c"].startswith("ambiguous: matches 2 modules")
    handle.remove()


def test_old_diffusers_attention_processor_keys_equal_diffusers_loading_them():
    """diffusers' pre-PEFT files (``unet.….attn1.processor.to_q_lora.down.weight``, ``to_out_lora``
    for ``to_out.0``) on a tiny UNet2DConditionModel: the same output as diffusers'
    load_lora_adapter, every key matched; in a text encoder ``to_q_lora`` is CLIP's ``q_proj``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj, layer in (("to_q", module.to_q), ("to_k", module.to_k), ("to_v", module.to_v), ("to_out", module.to_out[0])):  # fmt: skip
                sd[f"unet.{name}.processor.{proj}_lora.down.weight"] = torch.randn(
                    2, layer.in_features, generator=g
                )
                sd[f"unet.{name}.processor.{proj}_lora.up.weight"] = torch.randn(
                    layer.out_features, 2, generator=g
                )
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 8, generator=g)
    ref = copy.deepcopy(unet)
    ref.load_lora_adapter(dict(sd), prefix="unet")
    adapters = lp.load(sd)
    assert adapters.format == "diffusers_old" and not adapters.unknown_keys
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        assert (want - unet(x, t, ctx).sample).abs().max() > 0.1
        with lp.apply(unet, adapters) as handle:
            assert not handle.report.unmatched and len(handle.report.matched) == len(sd) // 2
            close(unet(x, t, ctx).sample, want, rtol=1e-5, atol=1e-5)
    te = lp.load({"text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight": torch.zeros(2, 4),
                  "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight": torch.zeros(4, 2)})  # fmt: skip
    assert list(te.adapters) == ["text_encoder.text_model.encoder.layers.0.self_attn.out_proj"]
