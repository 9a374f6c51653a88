"""Flux in BFL / ComfyUI layout: diffusers names mapped onto fused BFL modules.

double_blocks.N.img_attn.qkv = to_q | to_k | to_v, txt_attn.qkv = add_q/k/v_proj,
single_blocks.N.linear1 = to_q | to_k | to_v | proj_mlp. Sizes come from the model's shapes:
hidden = linear2.out_features (single) or qkv.out_features / 3 (double).
"""

from __future__ import annotations

import re

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, provider, split

DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK = re.compile(r"^(?P<root>(?:.*\.)?)(?P<kind>double_blocks|single_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")


@provider
def bfl_flux(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, Target], set[str]]:
    aliases: dict[str, Target] = {}
    roots: set[str] = set()
    for name, op in ops.items():
        m = _BLOCK.match(name)
        if not m:
            continue
        root, kind, n, rest = m["root"], m["kind"], m["n"], m["rest"]
        roots.add(root)
        if kind == "double_blocks":
            base = f"{root}transformer_blocks.{n}."
            if rest in ("img_attn.qkv", "txt_attn.qkv"):
                parts = (
                    ["attn.to_q", "attn.to_k", "attn.to_v"]
                    if rest.startswith("img")
                    else ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
                )
                third = op.out_features // 3
                aliases.update(split(name, [base + p for p in parts], [third] * 3))
            elif rest in DOUBLE:
                aliases[base + DOUBLE[rest]] = Target(name)
        else:
            base = f"{root}single_transformer_blocks.{n}."
            if rest == "linear1":
                hidden = ops.get(f"{root}single_blocks.{n}.linear2", op).out_features
                mlp = op.out_features - 3 * hidden
                if mlp > 0:
                    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                    aliases.update(split(name, [base + p for p in parts], [hidden] * 3 + [mlp]))
            elif rest in SINGLE:
                aliases[base + SINGLE[rest]] = Target(name)
    for root in roots:
        for bfl, diffusers_name in GLOBAL.items():
            if root + bfl in ops:
                aliases[root + diffusers_name] = Target(root + bfl)
    return aliases, set()
