"""Key conventions that need renaming before the generic reader sees them (each a regex rewrite
onto names the architecture tables know)."""

from __future__ import annotations

import re

from ..arch.text_encoders import text_encoder_key

# XLabs Flux LoRAs: processor-level names on BFL blocks, ``down``/``up`` without ``lora_``.
XLABS = [
    (re.compile(rf"^(?P<b>(?:.*\.)?double_blocks\.\d+)\.processor\.{src}\.(?P<w>down|up)\.weight$"), dst)
    for src, dst in (
        ("qkv_lora1", "img_attn.qkv"),
        ("qkv_lora2", "txt_attn.qkv"),
        ("proj_lora1", "img_attn.proj"),
        ("proj_lora2", "txt_attn.proj"),
    )
] + [
    (re.compile(rf"^(?P<b>(?:.*\.)?single_blocks\.\d+)\.processor\.{src}\.(?P<w>down|up)\.weight$"), dst)
    for src, dst in (("qkv_lora", "attn_qkv"), ("proj_lora", "linear2"))
]

# diffusers before PEFT (``save_attn_procs``, 2023): attention-processor names on the UNet
# (``attn1.processor.to_q_lora.down``, ``to_out_lora`` for ``to_out.0``), ``to_q_lora`` for CLIP's
# ``q_proj`` in text encoders (its ``lora_linear_layer.down`` suffixes are read as LoRA's own)
OLD_DIFFUSERS = re.compile(r"^(?P<m>.+?)(?:\.processor)?\.to_(?P<p>q|k|v|out)_lora\.(?P<w>down|up)\.weight$")


def _old_diffusers(key: str) -> str | None:
    m = OLD_DIFFUSERS.match(key)
    if m is None:
        return None
    if text_encoder_key(key) is not None:
        return f"{m['m']}.{m['p']}_proj.lora_{m['w']}.weight"
    return f"{m['m']}.{'to_out.0' if m['p'] == 'out' else 'to_' + m['p']}.lora_{m['w']}.weight"


def rewrite(key: str) -> tuple[str, str | None]:
    """(the key in a known convention, the variant's name or None)."""
    for pattern, dst in XLABS:
        m = pattern.match(key)
        if m:
            return f"{m['b']}.{dst}.lora_{m['w']}.weight", "xlabs"
    old = _old_diffusers(key)
    if old is not None:
        return old, "diffusers_old"
    return key, None
