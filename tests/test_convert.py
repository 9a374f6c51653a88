"""Conversions kohya <-> peft <-> comfy: tensors survive unchanged, scales survive, and each written
file loads in its reference tool (diffusers' load_lora_adapter, LyCORIS) with the same outputs."""

import copy

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
