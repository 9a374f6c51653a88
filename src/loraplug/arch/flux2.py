"""Flux.2: diffusers names and BFL names (what diffusers' own single-file converter maps).

Double blocks as Flux.1 (q/k/v fused in img_attn.qkv / txt_attn.qkv) with SwiGLU MLPs
(ff.linear_in/linear_out); single blocks are fused on both sides (linear1 = attn.to_qkv_mlp_proj);
modulation is shared per stream at the model level.
"""

from __future__ import annotations

import re

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, provider
from .layouts import Group, aliases

DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}
_MARKER = re.compile(
    r"^(?P<root>(?:.*\.)?)(?:single_stream_modulation\.lin|single_stream_modulation\.linear)$"
)
_BLOCK = re.compile(
    r"^(?:.*\.)?(?P<kind>double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(?P<n>\d+)\."
)


def flux2_groups(root: str, ops: dict[str, LayerOp]) -> list[Group]:
    doubles, singles = set(), set()
    for name in ops:
        m = _BLOCK.match(name[len(root) :] if name.startswith(root) else "")
        if m:
            (doubles if m["kind"] in ("double_blocks", "transformer_blocks") else singles).add(int(m["n"]))
    groups = [Group(root + o, (root + d,)) for o, d in GLOBAL.items()]
    groups.append(Group(root + "final_layer.adaLN_modulation.1", (root + "norm_out.linear",), swap=True))
    for n in sorted(doubles):
        groups += [Group(f"{root}double_blocks.{n}.{o}", tuple(f"{root}transformer_blocks.{n}.{p}" for p in parts))
                   for o, parts in DOUBLE.items()]  # fmt: skip
    for n in sorted(singles):
        groups += [Group(f"{root}single_blocks.{n}.{o}", (f"{root}single_transformer_blocks.{n}.{parts[0]}",))
                   for o, parts in SINGLE.items()]  # fmt: skip
    return groups


@provider
def flux2(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    found: dict[str, list[Target]] = {}
    for name in ops:
        m = _MARKER.match(name)
        if m:
            found.update(aliases(flux2_groups(m["root"], ops), model, ops))
    return found, set()
