"""SD3 / SD3.5 (MMDiT): diffusers names and the original / ComfyUI ``joint_blocks`` names.

joint_blocks.N.x_block.attn.qkv = to_q | to_k | to_v, context_block.attn.qkv = add_q/k/v_proj,
x_block.attn2.qkv = attn2's q|k|v (SD3.5's dual attention). The last block's context modulation
and the final modulation are (shift, scale) where diffusers has (scale, shift).
"""

from __future__ import annotations

import re

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, provider
from .layouts import Group, aliases

BLOCK = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
}
GLOBAL = {
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.linear": "proj_out",
}
_BLOCK = re.compile(r"^(?P<root>(?:.*\.)?)(?P<kind>joint_blocks|transformer_blocks)\.(?P<n>\d+)\.")
_SD3_MARKERS = ("context_block.", "attn.add_q_proj", "attn.to_add_out", "norm1_context.linear")


def sd3_groups(ops: dict[str, LayerOp]) -> list[Group]:
    blocks: dict[str, set[int]] = {}
    for name in ops:
        m = _BLOCK.match(name)
        if m and (m["kind"] == "joint_blocks" or name.endswith(_SD3_MARKERS)):
            blocks.setdefault(m["root"], set()).add(int(m["n"]))
    groups = []
    for root, numbers in blocks.items():
        last = max(numbers)
        for n in sorted(numbers):
            other, diffusers = f"{root}joint_blocks.{n}.", f"{root}transformer_blocks.{n}."
            groups += [Group(other + o, tuple(diffusers + p for p in parts)) for o, parts in BLOCK.items()]
            context = (diffusers + "norm1_context.linear",)
            groups.append(Group(other + "context_block.adaLN_modulation.1", context, swap=n == last))
        groups += [Group(root + o, (root + d,)) for o, d in GLOBAL.items()]
        groups.append(Group(root + "final_layer.adaLN_modulation.1", (root + "norm_out.linear",), swap=True))
    return groups


@provider
def sd3(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    if not any("joint_blocks." in n or n.endswith(_SD3_MARKERS) for n in ops):
        return {}, set()
    return aliases(sd3_groups(ops), model, ops), set()
