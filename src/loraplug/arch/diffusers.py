"""diffusers attention after ``fuse_qkv_projections()``: to_q/to_k/to_v live in ``to_qkv``.

diffusers keeps the split modules after fusing but no longer calls them, so a LoRA bound to
``to_q`` there would silently do nothing: those names are redirected to slices of the fused module
and the split modules are hidden from matching.
"""

from __future__ import annotations

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, provider, split

FUSIONS = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
    ("to_kv", ("to_k", "to_v")),
)


def fused_slices(fused: str, parts: tuple[str, ...], ops: dict[str, LayerOp]) -> dict[str, list[Target]]:
    """Each part's slice of ``fused``, sized from the parts' own shapes (or equal thirds)."""
    total = ops[fused].out_features
    sizes = [ops[p].out_features if p in ops else total // len(parts) for p in parts]
    if sum(sizes) != total:
        return {}
    return split(fused, list(parts), sizes)


@provider
def fused_attention(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    aliases: dict[str, list[Target]] = {}
    for name, module in model.named_modules():
        if not getattr(module, "fused_projections", False):
            continue
        prefix = f"{name}." if name else ""
        for fused, parts in FUSIONS:
            if prefix + fused not in ops:
                continue
            names = tuple(prefix + p for p in parts)
            for part, target in fused_slices(prefix + fused, names, ops).items():
                aliases[part] = target
    return aliases, set(aliases)


@provider
def peft_wrapped(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    """Layers already wrapped by PEFT (``x.base_layer``) keep answering to their own name ``x``."""
    return {
        name[: -len(".base_layer")]: [Target(name)] for name in ops if name.endswith(".base_layer")
    }, set()
