"""FreeFuse-style automatic masks: concept tokens from offsets, contrastive maps that find planted
regions, disjoint balanced masks, text masks and attention bias, and the two-pass loop on a tiny
Flux and a tiny SDXL-style UNet."""

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import loraplug as lp
from loraplug.demo import diffusers_lora_file
from loraplug.freefuse import (
    AttentionProbe,
    FreeFuse,
    attention_bias,
    concept_maps,
    concept_tokens,
    masks_from_maps,
    text_masks,
)
from loraplug.testing import flux_inputs, tiny_flux

PROMPT = "a photo of Harry Potter and a girl with red hair in a garden"


def _tokenizer():
    words = sorted(set(PROMPT.lower().split())) + ["</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_concept_tokens_follow_offsets_and_drop_stopwords():
    tok = _tokenizer()
    assert concept_tokens(tok, PROMPT, "Harry Potter") == [3, 4]
    assert concept_tokens(tok, PROMPT, "girl with red hair") == [7, 9, 10]  # "with" is a stopword
    with pytest.raises(ValueError, match="does not occur"):
        concept_tokens(tok, PROMPT, "wizard")


def _planted(grid=(4, 6), text=8, heads=2, dim=8, seed=0):
    """Queries on the left third look like concept 0's key, the rest like concept 1's."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    key = torch.randn(1, text, heads, dim, generator=g) * 0.1
    a, b = torch.randn(heads, dim, generator=g), torch.randn(heads, dim, generator=g)
    key[0, 2], key[0, 5] = a * 3, b * 3
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, : w // 3] = True
    query = (
        torch.where(left.reshape(1, -1, 1, 1), a * 3, b * 3)
        + torch.randn(1, h * w, heads, dim, generator=g) * 0.3
    )
    return query, key, left


def test_maps_find_planted_regions_and_masks_are_disjoint():
    query, key, left = _planted()
    maps = concept_maps(query, key, [[2], [5]], top_fraction=0.1)
    masks = masks_from_maps(maps, (4, 6), iterations=0, radius=0)
    assert masks.shape == (1, 2, 4, 6)
    assert torch.equal(masks.sum(1), torch.ones(1, 4, 6))  # disjoint and covering
    assert torch.equal(masks[0, 0].bool(), left)


def test_balancing_moves_area_toward_equal_shares():
    maps = torch.stack(
        [torch.full((1, 36), 0.6), torch.linspace(0.0, 1.0, 36)[None]], 1
    )  # channel 0 wins 60 %
    raw = masks_from_maps(maps, (6, 6), iterations=0, radius=0)[0].mean((1, 2))
    balanced = masks_from_maps(maps, (6, 6), iterations=40, radius=0)[0].mean((1, 2))
    assert abs(balanced[0] - 0.5) < abs(raw[0] - 0.5)


def test_text_masks_and_attention_bias():
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0, :, 0], masks[0, 1, :, 1] = 1, 1
    t = text_masks([[1], [3]], 5)
    assert t[0].tolist() == [1, 1, 1, 0, 1] and t[1].tolist() == [1, 0, 1, 1, 1]
    bias = attention_bias(masks, [[1], [3]], 5, own=2.0, other=-4.0)[0, 0]
    image = lambda r, c: 5 + r * 2 + c  # noqa: E731
    assert bias[1, image(0, 0)] == 2.0 and bias[1, image(0, 1)] == -4.0
    assert bias[image(1, 1), 3] == 2.0 and bias[image(1, 1), 1] == -4.0 and bias[0, 2] == 0.0


def test_two_pass_loop_on_a_tiny_flux(tmp_path):
    flux = tiny_flux()
    a = diffusers_lora_file(flux, tmp_path / "a.safetensors", rank=4, alpha=4.0, seed=1)
    b = diffusers_lora_file(flux, tmp_path / "b.safetensors", rank=4, alpha=4.0, seed=2)
    model = copy.deepcopy(flux)
    handle = lp.apply(model, [a, b])
    inputs = flux_inputs(image_tokens=16, text_tokens=6)
    ff = FreeFuse(
        handle, model.transformer_blocks[-1].attn, concepts=[[1, 2], [4]], grid=(4, 4), text_tokens=6
    )

    def run(steps, **kwargs):
        x = inputs["hidden_states"].clone()
        with torch.no_grad():
            for i in range(steps):
                v = model(
                    **{**inputs, "hidden_states": x, "timestep": torch.tensor([1 - i / steps])}, **kwargs
                )[0]
                x = x - v / steps
        return x

    with ff.collecting():
        assert not handle.enabled
        run(2)
    masks = ff.apply()
    assert handle.enabled and masks.shape == (1, 3, 4, 4)  # two subjects and a background
    assert torch.equal(masks.sum(1), torch.ones(1, 4, 4))
    plain = run(2)
    biased = run(2, **ff.attention_kwargs())
    assert not torch.allclose(plain, biased)
    handle.remove()


def _tiny_sdxl_unet():
    """A two-level SDXL-style UNet with cross-attention, random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)  # fmt: skip
    return unet


def test_probe_reads_sdxl_cross_attention():
    unet = _tiny_sdxl_unet()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    probe = AttentionProbe(attn)
    probe.armed = True
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 7, 16))
    assert probe.queries().shape[:2] == (1, 64) and probe.key.shape[:2] == (1, 7)
    maps = concept_maps(probe.queries(), probe.key, [[1], [3]])
    assert maps.shape == (1, 2, 64)


def test_unet_masks_reach_conv_maps_attention_tokens_and_spare_cross_attention_keys():
    from loraplug.runtime import bypass

    unet = _tiny_sdxl_unet()
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ("attn" in name or "conv1" in name):
            k = m.kernel_size if isinstance(m, torch.nn.Conv2d) else ()
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(2, m.weight.shape[1], *k, generator=g) * 0.3
            sd[f"unet.{name}.lora_B.weight"] = (
                torch.randn(m.weight.shape[0], 2, *([1] * len(k)), generator=g) * 0.3
            )
    args = (torch.randn(1, 4, 8, 8), 10)
    kwargs = {"encoder_hidden_states": torch.randn(1, 7, 16)}
    with torch.no_grad():
        base = unet(*args, **kwargs).sample
        with lp.apply(unet, sd) as handle:
            full = unet(*args, **kwargs).sample
            handle.set_mask(torch.zeros(16, 16), text_value=0.0)
            close_to_base = unet(*args, **kwargs).sample
            handle.set_mask(torch.ones(16, 16))
            ones = unet(*args, **kwargs).sample
            key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
            entry = bypass.runners(dict(unet.named_modules())[key[5:]]).entries[0]
            assert entry.stream == "text"
    torch.testing.assert_close(close_to_base, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ones, full, rtol=1e-5, atol=1e-5)
