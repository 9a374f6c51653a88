"""Z-Image (and Lumina-2-style NextDiT): diffusers names and the original / ComfyUI names.

The original fuses q|k|v in ``attention.qkv`` (query heads first, then the key and value heads)
and calls the output projection ``attention.out``; diffusers keeps the embedder and final layer
under ``all_x_embedder.2-1`` / ``all_final_layer.2-1``; ComfyUI's NextDiT puts each block's
modulation Linear at ``adaLN_modulation.1`` where both others have ``.0``.
"""

from __future__ import annotations

import re

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, provider
from .layouts import Group, aliases

_BLOCK = re.compile(
    r"^(?P<root>(?:.*\.)?)(?P<stack>layers|noise_refiner|context_refiner)\.(?P<n>\d+)\.attention\.(?:qkv|to_q)$"
)
GLOBAL = {
    "x_embedder": "all_x_embedder.2-1",
    "final_layer.linear": "all_final_layer.2-1.linear",
    "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
}


def zimage_groups(ops: dict[str, LayerOp]) -> list[Group]:
    groups, roots = [], set()
    for name in ops:
        m = _BLOCK.match(name)
        if not m:
            continue
        roots.add(m["root"])
        block = f"{m['root']}{m['stack']}.{m['n']}.attention."
        sizes = None
        if block + "qkv" in ops and block + "out" in ops:  # the original layout: q width = out's input
            q = ops[block + "out"].in_features
            kv = (ops[block + "qkv"].out_features - q) // 2
            sizes = (q, kv, kv)
        parts = tuple(block + p for p in ("to_q", "to_k", "to_v"))
        groups += [Group(block + "qkv", parts, sizes), Group(block + "out", (block + "to_out.0",))]
    for root in roots:
        groups += [Group(root + o, (root + d,)) for o, d in GLOBAL.items()]
    return groups


_ADALN = re.compile(
    r"^(?P<block>(?:.*\.)?(?:layers|noise_refiner|context_refiner)\.\d+\.adaLN_modulation)\.(?P<i>[01])$"
)


def comfy_adaln_groups(ops: dict[str, LayerOp]) -> list[Group]:
    """ComfyUI's NextDiT blocks hold the modulation Linear at ``adaLN_modulation.1`` (after a SiLU)
    where Z-Image checkpoints and diffusers have ``adaLN_modulation.0``: the same layer."""
    blocks = {m["block"] for name in ops if (m := _ADALN.match(name))}
    return [Group(f"{b}.1", (f"{b}.0",)) for b in sorted(blocks)]


@provider
def zimage(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    groups = zimage_groups(ops)
    if groups:  # a NextDiT model: its modulation layers under either index
        groups += comfy_adaln_groups(ops)
    return aliases(groups, model, ops), set()
