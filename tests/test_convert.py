"""Conversions kohya <-> peft <-> comfy: tensors survive unchanged, scales survive, and each written
file loads in its reference tool (diffusers' load_lora_adapter, LyCORIS) with the same outputs."""

import copy

import pytest
import torch
from conftest import close, randomize_
from lycoris import create_lycoris_from_weights
from lycoris.wrapper import LycorisNetwork
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

import loraplug as lp
from loraplug.testing import flux_inputs, tiny_flux

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"]


def _peft_lora(tmp_path):
    """A diffusers-format LoRA with per-module ranks and alphas (rank/alpha patterns), and the
    PEFT-adapted model that made it (the reference output)."""
    base = tiny_flux()
    model = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                        rank_pattern={"proj_mlp": 2}, alpha_pattern={"to_out.0": 3})  # fmt: skip
    model.add_adapter(config)
    randomize_(model, ("lora_A", "lora_B"), std=0.3)
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=config.to_dict(), weight_name="orig.safetensors")  # fmt: skip
    return base, model, tmp_path / "orig.safetensors"


def test_peft_kohya_comfy_round_trip(tmp_path):
    base, peft_model, orig = _peft_lora(tmp_path)
    inputs = flux_inputs()
    with torch.no_grad():
        want = peft_model(**inputs)[0]
    kohya = lp.save(lp.load(orig), tmp_path / "k.safetensors", format="kohya", model=base)
    comfy = lp.save(lp.load(kohya), tmp_path / "c.safetensors", format="comfy", model=base)
    back = lp.save(lp.load(comfy), tmp_path / "p.safetensors", format="peft", model=base)
    original, returned = load_file(orig), load_file(back)
    assert set(original) == set(returned)
    for key, tensor in original.items():
        assert torch.equal(tensor, returned[key]), key
    keys = set(load_file(kohya))
    assert "lora_unet_single_transformer_blocks_0_proj_mlp.alpha" in keys
    assert "diffusion_model.single_transformer_blocks.0.proj_mlp.lora_up.weight" in set(load_file(comfy))
    for path in (orig, kohya, comfy, back):
        with lp.apply(base, path) as handle, torch.no_grad():
            assert handle.report.ok
            close(base(**inputs)[0], want, rtol=1e-5, atol=1e-5)


def test_written_peft_file_loads_in_diffusers(tmp_path):
    base, peft_model, orig = _peft_lora(tmp_path)
    kohya = lp.save(lp.load(orig), tmp_path / "k.safetensors", format="kohya", model=base)
    lp.save(lp.load(kohya), tmp_path / "p.safetensors", format="peft", model=base)
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert "transformer.lora_alpha" in f.metadata()["lora_adapter_metadata"]
    inputs = flux_inputs()
    reference = copy.deepcopy(base)
    reference.load_lora_adapter(str(tmp_path), weight_name="p.safetensors", prefix="transformer")
    with torch.no_grad():
        close(reference(**inputs)[0], peft_model(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_written_kohya_file_loads_in_lycoris(tmp_path):
    base, peft_model, orig = _peft_lora(tmp_path)
    kohya = lp.save(lp.load(orig), tmp_path / "k.safetensors", format="kohya", model=base)
    reference = copy.deepcopy(base)
    prefix = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, str(kohya), reference)
        network.apply_to()
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    assert len(network.loras) == len(lp.load(kohya))
    inputs = flux_inputs()
    with torch.no_grad():
        close(reference(**inputs)[0], peft_model(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_rslora_and_dtype_survive_kohya(tmp_path):
    sd = {"lin.lora_A.weight": torch.randn(4, 6), "lin.lora_B.weight": torch.randn(5, 4)}
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(6, 5)
    from loraplug.formats import parse

    adapters = parse(sd, config={"lora_alpha": 2, "use_rslora": True, "r": 4})
    x = torch.randn(2, 6)
    with lp.apply(model, adapters):
        want = model.lin(x)
    path = lp.save(adapters, tmp_path / "k.safetensors", format="kohya", dtype=torch.bfloat16)
    assert load_file(path)["lora_unet_lin.lora_down.weight"].dtype == torch.bfloat16
    with lp.apply(model, path):
        close(model.lin(x), want, rtol=2e-2, atol=2e-2)


def test_text_encoder_keys_convert_under_their_component(tmp_path):
    """A kohya file with text-encoder and transformer keys, written as peft: the text encoder's keys
    under ``text_encoder.`` (not the transformer) and loading in diffusers'
    load_lora_into_text_encoder with the same output as loraplug's apply; ComfyUI's
    ``text_encoders.clip_l.transformer.`` keys and a kohya round trip keep the component."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        vocab_size=100, max_position_embeddings=16)).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        for part, name, out, inp in (
            ("self_attn", "q_proj", 8, 8),
            ("mlp", "fc1", 16, 8),
            ("mlp", "fc2", 8, 16),
        ):
            key = f"lora_te1_text_model_encoder_layers_{i}_{part}_{name}"
            sd[f"{key}.lora_down.weight"] = torch.randn(2, inp, generator=g)
            sd[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g)
            sd[f"{key}.alpha"] = torch.tensor(1.0)
    sd["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"] = torch.randn(2, 16, generator=g)
    sd["lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"] = torch.randn(16, 2, generator=g)
    ids = torch.randint(0, 100, (1, 7), generator=g)
    with torch.no_grad():
        plain = clip(ids).last_hidden_state
        with lp.apply(clip, sd, strict=False):
            want = clip(ids).last_hidden_state
    assert (want - plain).abs().max() > 0.1

    flux = tiny_flux()
    path = lp.save(lp.load(sd), tmp_path / "peft.safetensors", format="peft", model=flux)
    keys = load_file(path)
    assert {k.split(".", 1)[0] for k in keys} == {"text_encoder", "transformer"}
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_A.weight" in keys
    state, meta = FluxPipeline.lora_state_dict(path, return_lora_metadata=True)
    ref = copy.deepcopy(clip)
    FluxPipeline.load_lora_into_text_encoder(state, None, ref, prefix="text_encoder", metadata=meta)
    with torch.no_grad():
        close(ref(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)

    back = load_file(lp.save(lp.load(path), tmp_path / "kohya.safetensors", format="kohya", model=flux))
    assert {k for k in back if k.startswith("lora_te1_")} == {k for k in sd if k.startswith("lora_te1_")}
    comfy = {k.replace("lora_te1_text_model_", "text_encoders.clip_l.transformer.text_model.")
             .replace("_layers_", ".layers.").replace("_self_attn_", ".self_attn.").replace("_mlp_", ".mlp."): v
             for k, v in sd.items() if k.startswith("lora_te1_")}  # fmt: skip
    with torch.no_grad(), lp.apply(clip, comfy, strict=False) as handle:
        assert not handle.report.unmatched
        close(clip(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    written = load_file(lp.save(lp.load(comfy), tmp_path / "c.safetensors", format="comfy", model=flux))
    assert set(written) == set(comfy)
    # transformers 5's CLIPTextModel has no text_model wrapper; files keep the long form
    short = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(path).items()}
    assert set(load_file(lp.save(lp.load(short), tmp_path / "k5.safetensors", format="kohya"))) == set(back)


def test_comfy_t5xxl_keys_write_as_kohya_te3(tmp_path):
    """ComfyUI's t5xxl text-encoder keys: written as kohya under lora_te3_ (kohya's T5 prefix in
    Flux and SD3 files, which ComfyUI reads as its t5xxl), the same change of a T5 encoder when
    applied; PEFT, which numbers text encoders by pipeline position, refuses them with a way out."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2)).eval()
    g = torch.Generator().manual_seed(0)
    comfy = {}
    for i in range(2):
        for module, out, inp in (("layer.0.SelfAttention.q", 8, 8), ("layer.1.DenseReluDense.wo", 8, 16)):
            key = f"text_encoders.t5xxl.transformer.encoder.block.{i}.{module}"
            comfy[f"{key}.lora_down.weight"] = torch.randn(2, inp, generator=g)
            comfy[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g)
            comfy[f"{key}.alpha"] = torch.tensor(1.0)
    ids = torch.randint(0, 50, (1, 5), generator=g)
    with torch.no_grad():
        plain = t5(ids).last_hidden_state
        with lp.apply(t5, comfy) as handle:
            assert not handle.report.unmatched
            want = t5(ids).last_hidden_state
    assert (want - plain).abs().max() > 0.1

    kohya = load_file(lp.save(lp.load(comfy), tmp_path / "k.safetensors", format="kohya"))
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo.lora_up.weight" in kohya
    assert all(k.startswith("lora_te3_encoder_block_") for k in kohya)
    with torch.no_grad(), lp.apply(t5, kohya) as handle:
        assert not handle.report.unmatched
        close(t5(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(lp.FormatError, match="format='kohya'"):
        lp.save(lp.load(comfy), tmp_path / "p.safetensors", format="peft")
