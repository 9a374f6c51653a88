"""Key conventions that need renaming before the generic reader sees them (each a regex rewrite
onto names the architecture tables know)."""

from __future__ import annotations

import re

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


def rewrite(key: str) -> tuple[str, str | None]:
    """(the key in a known convention, the variant's name or None)."""
    for pattern, dst in XLABS:
        m = pattern.match(key)
        if m:
            return f"{m['b']}.{dst}.lora_{m['w']}.weight", "xlabs"
    return key, None
