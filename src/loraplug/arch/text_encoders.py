"""Text-encoder keys in LoRA files: the pipeline component each prefix names, and the module path
of kohya's flattened names for the two text-encoder architectures diffusion pipelines use (CLIP
and T5), whose module names are fixed — so a flattened name has exactly one dotted form."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TextEncoderKey:
    """A key of a text encoder: its file prefix, the component, the module path after the prefix
    and whether that path is kohya-flattened (``_`` for ``.``)."""

    prefix: str
    component: str
    rest: str
    flat: bool


# (prefix, component, flattened). diffusers' names: text_encoder is CLIP-L in every pipeline,
# text_encoder_2 CLIP-G (SDXL, SD3) or T5 (Flux); ComfyUI names the model itself (clip_l, clip_g,
# t5xxl), and its T5 is text_encoder_2 in Flux but text_encoder_3 in SD3 — kept as "t5xxl".
PREFIXES = (
    ("lora_te1_", "text_encoder", True),
    ("lora_te2_", "text_encoder_2", True),
    ("lora_te3_", "text_encoder_3", True),
    ("lora_te_", "text_encoder", True),
    ("text_encoder.", "text_encoder", False),
    ("text_encoder_2.", "text_encoder_2", False),
    ("text_encoder_3.", "text_encoder_3", False),
    ("text_encoders.clip_l.transformer.", "text_encoder", False),
    ("text_encoders.clip_g.transformer.", "text_encoder_2", False),
    ("text_encoders.t5xxl.transformer.", "t5xxl", False),
)
KOHYA_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
# kohya's T5 is lora_te3_ in Flux files as in SD3 files (sd-scripts, "make ComfyUI compatible"), and
# ComfyUI reads lora_te3_ as its t5xxl in both (Flux also lora_te2_): where ComfyUI's t5xxl goes
KOHYA_T5 = "lora_te3_"

_CLIP = re.compile(
    r"^(?P<tm>text_model_)?encoder_layers_(?P<i>\d+)_(?P<part>self_attn|mlp)_"
    r"(?P<name>q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"
)
_T5 = re.compile(
    r"^encoder_block_(?P<i>\d+)_layer_(?P<j>\d+)_(?P<part>SelfAttention|DenseReluDense)_"
    r"(?P<name>q|k|v|o|wi_0|wi_1|wi|wo)$"
)


def text_encoder_key(key: str) -> TextEncoderKey | None:
    """The key's text-encoder reading, or None when it names no text encoder."""
    for prefix, component, flat in PREFIXES:
        if key.startswith(prefix):
            return TextEncoderKey(prefix, component, key[len(prefix) :], flat)
    return None


def dotted(flat_name: str) -> str | None:
    """The module path of a flattened CLIP or T5 module name, or None when it is neither."""
    if flat_name == "text_projection":
        return flat_name
    m = _CLIP.match(flat_name)
    if m:
        return f"{'text_model.' if m['tm'] else ''}encoder.layers.{m['i']}.{m['part']}.{m['name']}"
    m = _T5.match(flat_name)
    if m:
        return f"encoder.block.{m['i']}.layer.{m['j']}.{m['part']}.{m['name']}"
    return None


def canonical(module: str) -> str:
    """A text-encoder module path as files write it: CLIP's body under ``text_model.`` (kohya's
    ``lora_te1_text_model_…``, diffusers' ``text_encoder.text_model.…``, which ComfyUI and kohya
    match), also when the path came from transformers 5's ``CLIPTextModel`` that dropped the
    wrapper; T5 and ``text_projection`` paths as they are."""
    return (
        "text_model." + module
        if module.startswith(("encoder.layers.", "embeddings.", "final_layer_norm"))
        else module
    )


def peft_target(module: str) -> str:
    """A text-encoder module path as a PEFT target: without CLIP's ``text_model.`` wrapper, which
    transformers 5 dropped from ``CLIPTextModel`` (PEFT matches a target as a path suffix, so
    the short form names the same module on transformers 4 too); files keep the long form."""
    return module.removeprefix("text_model.")
