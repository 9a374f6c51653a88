"""The loraplug loader inside a real ComfyUI: bypass output equals ComfyUI's own merge
(load_lora_for_models + patch_model) for diffusers- and kohya-format files, chained loaders stack,
unpatching restores the model bit-identically."""

import torch
from conftest import run, tiny_flux_patcher
from safetensors.torch import save_file


def _files(env, model):
    """A diffusers-format LoRA (split q/k/v names) and a kohya-format one (BFL names)."""
    g = torch.Generator().manual_seed(1)
    diffusers_sd, kohya_sd = {}, {}
    names = {
        "transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.0.attn.to_v": (32, 32),
        "transformer_blocks.0.attn.add_k_proj": (32, 32), "single_transformer_blocks.0.proj_mlp": (32, 128),
        "transformer_blocks.0.ff.net.0.proj": (32, 128),
    }  # fmt: skip
    for name, (i, o) in names.items():
        diffusers_sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, i, generator=g) * 0.3
        diffusers_sd[f"transformer.{name}.lora_B.weight"] = torch.randn(o, 2, generator=g) * 0.3
    modules = dict(model.model.diffusion_model.named_modules())
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.txt_mlp.0"):
        m = modules[name]
        key = "lora_unet_" + name.replace(".", "_")
        kohya_sd[key + ".lora_down.weight"] = torch.randn(3, m.in_features, generator=g) * 0.3
        kohya_sd[key + ".lora_up.weight"] = torch.randn(m.out_features, 3, generator=g) * 0.3
        kohya_sd[key + ".alpha"] = torch.tensor(1.5)
    save_file(diffusers_sd, str(env["loras"] / "diffusers.safetensors"))
    save_file(kohya_sd, str(env["loras"] / "kohya.safetensors"))
    return diffusers_sd, kohya_sd


def _comfy_merged(env, patcher, sds_strengths):
    comfy = env["comfy"]
    model = patcher
    for sd, strength in sds_strengths:
        model, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0)
    model.patch_model()
    out = run(model)
    model.unpatch_model()
    return out


def test_bypass_loader_equals_comfy_merge_and_stacks(comfy):
    from comfyui_loraplug.nodes import LoraplugLoraLoader

    patcher = tiny_flux_patcher(comfy)
    diffusers_sd, kohya_sd = _files(comfy, patcher)
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    plain = run(patcher)
    loader = LoraplugLoraLoader()
    for name, sd in (("diffusers.safetensors", diffusers_sd), ("kohya.safetensors", kohya_sd)):
        result = loader.load(patcher, name, 0.8)
        loaded = result["result"][0]
        assert "matched" in result["ui"]["text"][0] and "unmatched" not in result["ui"]["text"][0]
        loaded.patch_model()
        got = run(loaded)
        loaded.unpatch_model()
        want = _comfy_merged(comfy, patcher, [(sd, 0.8)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, plain, atol=1e-4)
    first = loader.load(patcher, "diffusers.safetensors", 1.0)["result"][0]
    second = loader.load(first, "kohya.safetensors", 0.5)["result"][0]
    second.patch_model()
    got = run(second)
    second.unpatch_model()
    want = _comfy_merged(comfy, patcher, [(diffusers_sd, 1.0), (kohya_sd, 0.5)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = patcher.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(run(patcher), plain)
    assert not any(m._forward_hooks for m in patcher.model.modules())


def test_sampling_through_comfy_with_the_loader(comfy):
    sampling = comfy["comfy"].sample

    from comfyui_loraplug.nodes import LoraplugLoraLoader

    patcher = tiny_flux_patcher(comfy)
    _files(comfy, patcher)
    loaded = LoraplugLoraLoader().load(patcher, "kohya.safetensors", 1.0)["result"][0]
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 5, 16, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]
    negative = [[torch.zeros(1, 5, 16), {"pooled_output": torch.zeros(1, 8)}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = sampling.prepare_noise(latent, 0)

    def sample(model):
        return sampling.sample(model, noise, 3, 1.0, "euler", "simple", positive, negative, latent, seed=0)

    with_lora, without = sample(loaded), sample(patcher)
    assert with_lora.shape == latent.shape and torch.isfinite(with_lora).all()
    assert not torch.allclose(with_lora, without, atol=1e-4)
    assert not any(m._forward_hooks for m in patcher.model.modules())  # ejected after sampling


def test_fp8_weights_through_comfy_ops_run_in_bypass(comfy):
    """fp8 storage with ComfyUI's manual-cast ops: the adapter runs beside the fp8 weights (left as
    they are, adapters stay float) and matches ComfyUI's merge on the dequantized float model."""
    from conftest import UNET

    from comfyui_loraplug.nodes import LoraplugLoraLoader

    env = comfy["comfy"]
    reference = tiny_flux_patcher(comfy)
    _, kohya_sd = _files(comfy, reference)
    config = env.supported_models.Flux(dict(UNET))
    config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    fp8_model = env.model_base.Flux(config, device="cpu")
    with torch.no_grad():
        ref_params = dict(reference.model.named_parameters())
        for name, p in fp8_model.named_parameters():
            p.copy_(ref_params[name].to(p.dtype))
            ref_params[name].copy_(p.to(torch.float32))  # the reference holds exactly the fp8 values
    cpu = torch.device("cpu")
    fp8 = env.model_patcher.ModelPatcher(fp8_model, load_device=cpu, offload_device=cpu)
    qkv = fp8_model.diffusion_model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    stored = qkv.weight.detach().clone()
    loaded = LoraplugLoraLoader().load(fp8, "kohya.safetensors", 1.0)["result"][0]
    loaded.patch_model()
    got = run(loaded)
    from loraplug.runtime import bypass

    entry = bypass.runners(qkv).entries[0]
    assert all(t.dtype == torch.float32 for t in entry.patch.all_tensors().values())
    loaded.unpatch_model()
    want = _comfy_merged(comfy, reference, [(kohya_sd, 1.0)])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(qkv.weight.view(torch.uint8), stored.view(torch.uint8))


def test_stack_with_masks(comfy):
    from comfyui_loraplug.nodes import LoraplugLoraLoader, LoraplugLoraStack

    patcher = tiny_flux_patcher(comfy)
    diffusers_sd, kohya_sd = _files(comfy, patcher)

    def out(model):
        model.patch_model()
        try:
            return run(model)
        finally:
            model.unpatch_model()

    stacked = LoraplugLoraStack().load(patcher, lora_1="diffusers.safetensors", strength_1=1.0,
                                       lora_2="kohya.safetensors", strength_2=0.5)["result"][0]  # fmt: skip
    torch.testing.assert_close(out(stacked), _comfy_merged(comfy, patcher, [(diffusers_sd, 1.0), (kohya_sd, 0.5)]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    plain = run(patcher)
    zero = LoraplugLoraLoader().load(patcher, "kohya.safetensors", 1.0, mask=torch.zeros(1, 16, 16))[
        "result"
    ][0]
    masked = out(zero)
    full = out(LoraplugLoraLoader().load(patcher, "kohya.safetensors", 1.0)["result"][0])
    assert not torch.allclose(full, plain, atol=1e-4)
    # image tokens untouched by a zero mask; text tokens (mask's text value 1) still carry the LoRA
    left = torch.zeros(1, 16, 16)
    left[..., :8] = 1.0
    half = out(LoraplugLoraLoader().load(patcher, "kohya.safetensors", 1.0, mask=left)["result"][0])
    assert masked.shape == half.shape == full.shape
    assert not torch.allclose(half, full, atol=1e-5) and not torch.allclose(half, masked, atol=1e-5)


def test_train_in_comfy_and_save_for_comfys_own_loader(comfy):
    from safetensors.torch import load_file

    from comfyui_loraplug.nodes import LoraplugSaveLora, LoraplugTrainLora

    patcher = tiny_flux_patcher(comfy)
    g = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    positive = [[torch.randn(1, 5, 16, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    adapters, losses = LoraplugTrainLora().train(patcher, latents, positive, "lora", 4, "attn", 30, 1e-2, 0)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert all(torch.equal(v, patcher.model.state_dict()[k]) for k, v in before.items())  # base untouched
    assert not any(m._forward_hooks for m in patcher.model.modules())
    names = list(adapters["result"].adapters.adapters)
    assert any(n.endswith("attn.to_q") for n in names)  # per-slice adapters on the fused qkv
    path = LoraplugSaveLora().save(adapters, "trained", "comfy")["result"][0]
    sd = load_file(path)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in sd  # one fused LoRA
    import loraplug as lp

    with lp.apply(patcher.model.diffusion_model, adapters["result"].adapters):
        want = run(patcher)
    torch.testing.assert_close(_comfy_merged(comfy, patcher, [(sd, 1.0)]), want, rtol=1e-5, atol=1e-5)


def test_freefuse_node_pair(comfy):
    from comfyui_loraplug.freefuse import LoraplugFreeFuseApply, LoraplugFreeFuseMasks

    patcher = tiny_flux_patcher(comfy)
    _files(comfy, patcher)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 5, 16, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]
    negative = [[torch.zeros(1, 5, 16), {"pooled_output": torch.zeros(1, 8)}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    masks, freefuse = LoraplugFreeFuseMasks().collect(
        patcher, positive, negative, latent, 0, 6, 3, "1,2;3", 1.0, 0.1
    )
    assert masks.shape == (2, 4, 4) and torch.all(masks.sum(0) <= 1)  # disjoint (the rest is background)
    assert freefuse["text"][0].tolist() == [1, 1, 1, 0, 1] and freefuse["text"][1].tolist() == [1, 0, 0, 1, 1]
    applied = LoraplugFreeFuseApply().apply(
        patcher, freefuse, "diffusers.safetensors", "kohya.safetensors", 1.0
    )[0]
    applied.patch_model()
    try:
        got = run(applied)
    finally:
        applied.unpatch_model()
    assert torch.isfinite(got).all() and not torch.allclose(got, run(patcher), atol=1e-5)
    assert not any(m._forward_hooks for m in patcher.model.modules())
    # the attention bias: passed as the Flux model's attention_mask, as loraplug.freefuse builds it
    from loraplug.freefuse import attention_bias

    biased = LoraplugFreeFuseApply().apply(
        patcher, freefuse, "diffusers.safetensors", "kohya.safetensors", 1.0, attention_bias=True
    )[0]
    x, sigma, context, y = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([0.6]),
        positive[0][0],
        positive[0][1]["pooled_output"],
    )

    def denoised(model, **kwargs):
        model.patch_model()
        try:
            with torch.no_grad():
                options = {"wrappers": model.wrappers}
                return model.model.apply_model(
                    x, sigma, c_crossattn=context, y=y, transformer_options=options, **kwargs
                )
        finally:
            model.unpatch_model()

    bias = attention_bias(freefuse["masks"][None], freefuse["concepts"], context.shape[1])
    assert bias.shape == (1, 1, 5 + 16, 5 + 16) and bias.abs().sum() > 0
    want = denoised(applied, attention_mask=bias)
    torch.testing.assert_close(denoised(biased), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, denoised(applied), atol=1e-5)


def _tiny_clip(env):
    """A ComfyUI CLIP (comfy.sd.CLIP around a two-layer CLIP-L text encoder), weights filled."""
    import functools
    import importlib

    comfy = env["comfy"]
    sd1_clip = importlib.import_module("comfy.sd1_clip")

    config = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
              "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # fmt: skip
    text_model = functools.partial(
        comfy.sd1_clip.SDClipModel,
        textmodel_json_config=config,
        special_tokens={"start": 0, "end": 2, "pad": 1},
    )
    model = sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32, clip_model=text_model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    clip = comfy.sd.CLIP(no_init=True)
    cpu = torch.device("cpu")
    clip.cond_stage_model, clip.tokenizer, clip.layer_idx = model, None, None
    clip.patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    clip.tokenizer_options, clip.use_clip_schedule, clip.apply_hooks_to_conds = {}, False, None
    return clip


def _encode(clip):
    clip.patcher.patch_model()
    try:
        with torch.no_grad():
            tokens = torch.tensor([[0, 5, 17, 300, 2] + [1] * 72])  # 77 positions
            return clip.cond_stage_model.clip_l.transformer(tokens)[0]
    finally:
        clip.patcher.unpatch_model()


def test_loader_applies_text_encoder_keys_to_clip_like_comfy(comfy):
    """A kohya file with text-encoder (lora_te_) and UNet keys: the loader's CLIP output equals
    ComfyUI's own merge on the CLIP, the UNet keys go to the model, the CLIP comes back untouched."""
    from safetensors.torch import save_file

    from comfyui_loraplug.nodes import LoraplugLoraLoader

    patcher, clip = tiny_flux_patcher(comfy), _tiny_clip(comfy)
    _, kohya_sd = _files(comfy, patcher)
    g = torch.Generator().manual_seed(4)
    sd = dict(kohya_sd)
    for b in range(2):
        for part in ("self_attn_q_proj", "self_attn_v_proj", "mlp_fc1"):
            name = part.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            lin = clip.cond_stage_model.get_submodule(
                f"clip_l.transformer.text_model.encoder.layers.{b}.{name}"
            )
            key = f"lora_te_text_model_encoder_layers_{b}_{part}"
            sd[key + ".lora_down.weight"] = torch.randn(2, lin.in_features, generator=g) * 0.3
            sd[key + ".lora_up.weight"] = torch.randn(lin.out_features, 2, generator=g) * 0.3
            sd[key + ".alpha"] = torch.tensor(1.0)
    save_file(sd, str(comfy["loras"] / "with_te.safetensors"))
    before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    plain = _encode(clip)
    model, new_clip, text = LoraplugLoraLoader().load(patcher, "with_te.safetensors", 1.0, clip, 0.7)[
        "result"
    ]
    got = _encode(new_clip)
    _, reference = comfy["comfy"].sd.load_lora_for_models(None, clip, sd, 0.0, 0.7)
    want = _encode(reference)
    assert not torch.allclose(want, plain, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in clip.cond_stage_model.modules())
    model.patch_model()
    torch.testing.assert_close(
        run(model), _comfy_merged(comfy, patcher, [(kohya_sd, 1.0)]), rtol=1e-5, atol=1e-5
    )
    model.unpatch_model()


def test_strength_schedule_follows_the_sigmas(comfy):
    """Through ComfyUI's apply_model (its wrappers as sampling installs them): at the sigma of 25 %
    of the sampling the schedule 0 → 1 over 0–50 % runs the LoRA at strength 0.5, at 75 % at 1.0,
    equal to plain loaders at those strengths; sampling runs with it."""
    from comfyui_loraplug.nodes import LoraplugLoraLoader, LoraplugLoraSchedule, sigma_percent

    patcher = tiny_flux_patcher(comfy)
    _files(comfy, patcher)
    scheduled = LoraplugLoraSchedule().load(patcher, "kohya.safetensors", 0.0, 1.0, 0.0, 0.5)["result"][0]
    sampling = patcher.model.model_sampling
    g = torch.Generator().manual_seed(0)
    x, context, y = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 5, 16, generator=g),
        torch.randn(1, 8, generator=g),
    )

    def denoised(model, percent):
        sigma = torch.tensor([sampling.percent_to_sigma(percent)])
        model.patch_model()
        try:
            with torch.no_grad():
                options = {"wrappers": model.wrappers}
                return model.model.apply_model(
                    x, sigma, c_crossattn=context, y=y, transformer_options=options
                )
        finally:
            model.unpatch_model()

    assert abs(sigma_percent(sampling, sampling.percent_to_sigma(0.3)) - 0.3) < 1e-6
    loader = LoraplugLoraLoader()
    for percent, strength in ((0.25, 0.5), (0.75, 1.0), (0.0, 0.0)):
        want = denoised(loader.load(patcher, "kohya.safetensors", strength)["result"][0], percent)
        torch.testing.assert_close(denoised(scheduled, percent), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(denoised(scheduled, 0.25), denoised(scheduled, 0.75), atol=1e-4)
    sample = comfy["comfy"].sample
    positive = [[context, {"pooled_output": y}]]
    negative = [[torch.zeros(1, 5, 16), {"pooled_output": torch.zeros(1, 8)}]]
    latent = torch.zeros(1, 4, 8, 8)
    out = sample.sample(
        scheduled,
        sample.prepare_noise(latent, 0),
        4,
        1.0,
        "euler",
        "simple",
        positive,
        negative,
        latent,
        seed=0,
    )
    assert torch.isfinite(out).all()
    comfy["comfy"].model_management.unload_all_models()  # ComfyUI keeps the last model loaded
    assert not any(m._forward_hooks for m in patcher.model.modules())


def test_text_encoder_keys_written_by_loraplug_are_in_comfys_key_map(comfy, tmp_path):
    """ComfyUI's own CLIP key map (comfy.lora.model_lora_keys_clip, Flux's clip_l + t5xxl) as the
    oracle for the text-encoder names loraplug writes: a diffusers file with transformers-5 CLIP
    paths (no ``text_model.``) and T5 paths, converted to kohya and comfy, names only keys ComfyUI
    loads."""
    import comfy.lora
    from safetensors.torch import load_file

    import loraplug as lp

    clip_parts = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    )
    t5_parts = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wo")  # fmt: skip
    weights = [
        f"clip_l.transformer.text_model.encoder.layers.{b}.{p}.weight" for b in range(2) for p in clip_parts
    ]
    weights += [f"t5xxl.transformer.encoder.block.{b}.{p}.weight" for b in range(2) for p in t5_parts]

    class StateDictOnly:
        def state_dict(self):
            return dict.fromkeys(weights)

    key_map = comfy.lora.model_lora_keys_clip(StateDictOnly(), {})
    sd = {}
    for b in range(2):
        for p in clip_parts:
            sd[f"text_encoder.encoder.layers.{b}.{p}.lora_A.weight"] = torch.zeros(2, 8)
            sd[f"text_encoder.encoder.layers.{b}.{p}.lora_B.weight"] = torch.zeros(8, 2)
        for p in t5_parts:
            sd[f"text_encoder_2.encoder.block.{b}.{p}.lora_A.weight"] = torch.zeros(2, 8)
            sd[f"text_encoder_2.encoder.block.{b}.{p}.lora_B.weight"] = torch.zeros(8, 2)
    for fmt in ("kohya", "comfy"):
        written = load_file(lp.save(lp.load(sd), tmp_path / f"{fmt}.safetensors", format=fmt))
        modules = {k.rsplit(".", 2)[0] for k in written if k.endswith(".lora_down.weight")}
        assert len(modules) == len(sd) // 2
        assert modules <= set(key_map), sorted(modules - set(key_map))[:4]


def test_comfys_clip_key_map_resolves_t5xxl_keys_written_as_kohya(comfy, tmp_path):
    """ComfyUI's own text-encoder key map (comfy.lora.model_lora_keys_clip) finds every kohya key
    loraplug writes for ComfyUI-format t5xxl keys, with Flux's text encoders (clip_l + t5xxl) and
    SD3's (clip_l + clip_g + t5xxl), each on the T5 weight it names."""
    from safetensors.torch import load_file

    import loraplug as lp

    modules = ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wo")
    comfy_sd = {}
    for m in modules:
        comfy_sd[f"text_encoders.t5xxl.transformer.{m}.lora_down.weight"] = torch.randn(2, 8)
        comfy_sd[f"text_encoders.t5xxl.transformer.{m}.lora_up.weight"] = torch.randn(8, 2)
    written = load_file(lp.save(lp.load(comfy_sd), tmp_path / "k.safetensors", format="kohya"))
    names = {k.rsplit(".", 2)[0] for k in written}
    assert len(names) == len(modules)
    clip_l = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    clip_g = "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    for encoders in ([clip_l], [clip_l, clip_g]):  # Flux, SD3
        keys = dict.fromkeys([*encoders, *(f"t5xxl.transformer.{m}.weight" for m in modules)])
        clip = type(
            "Clip", (), {"state_dict": lambda self, keys=keys: keys}
        )()  # the map reads only the names
        key_map = comfy["comfy"].lora.model_lora_keys_clip(clip, {})
        assert {key_map[n] for n in names} == {f"t5xxl.transformer.{m}.weight" for m in modules}
