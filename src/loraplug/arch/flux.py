"""Flux: diffusers names and BFL / ComfyUI names, in both directions, sizes from real shapes.

BFL fuses what diffusers splits: double_blocks.N.img_attn.qkv = to_q | to_k | to_v,
txt_attn.qkv = add_q/k/v_proj, single_blocks.N.linear1 = to_q | to_k | to_v | proj_mlp; and its
final modulation is (shift, scale) where diffusers' norm_out.linear is (scale, shift).

- A BFL-layout model gets the diffusers names as aliases (a diffusers LoRA lands in slices).
- A diffusers-layout model (split, or fused with fuse_qkv_projections) gets the BFL names as
  aliases (a kohya/ComfyUI LoRA trained on fused qkv spreads its rows over q, k and v).
``single_blocks.N.attn_qkv`` names linear1's q|k|v part (XLabs' single-block "qkv_lora").
"""

from __future__ import annotations

import re

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, provider, split, spread

QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
DOUBLE_ONE_TO_ONE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
SINGLE_ONE_TO_ONE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
GLOBAL_ONE_TO_ONE = {
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
FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")
_BFL = re.compile(r"^(?P<root>(?:.*\.)?)(?P<kind>double_blocks|single_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")
_DIFFUSERS = re.compile(
    r"^(?P<root>(?:.*\.)?)(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<n>\d+)\."
)


def _swapped_halves(module: str, half: int) -> list[Target]:
    """Output halves exchanged: the adapter's rows [0:h] go to [h:2h] and back."""
    return [Target(module, half, half, rows=(0, half)), Target(module, 0, half, rows=(half, half))]


@provider
def bfl_layout(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    """diffusers names on a BFL/ComfyUI-layout Flux."""
    aliases: dict[str, list[Target]] = {}
    roots: set[str] = set()
    for name, op in ops.items():
        m = _BFL.match(name)
        if not m:
            continue
        root, n, rest = m["root"], m["n"], m["rest"]
        roots.add(root)
        if m["kind"] == "double_blocks":
            base = f"{root}transformer_blocks.{n}."
            if rest in ("img_attn.qkv", "txt_attn.qkv"):
                parts, fused = (
                    (QKV, "attn.to_qkv") if rest.startswith("img") else (ADDED_QKV, "attn.to_added_qkv")
                )
                third = op.out_features // 3
                aliases.update(split(name, [base + p for p in parts], [third] * 3))
                aliases[base + fused] = [Target(name)]
            elif rest in DOUBLE_ONE_TO_ONE:
                aliases[base + DOUBLE_ONE_TO_ONE[rest]] = [Target(name)]
        else:
            base = f"{root}single_transformer_blocks.{n}."
            if rest == "linear1":
                hidden = ops.get(f"{root}single_blocks.{n}.linear2", op).out_features
                mlp = op.out_features - 3 * hidden
                if mlp > 0:
                    names = [base + p for p in (*QKV, "proj_mlp")]
                    aliases.update(split(name, names, [hidden] * 3 + [mlp]))
                    aliases[base + "attn.to_qkv"] = [Target(name, 0, 3 * hidden)]
                    aliases[f"{root}single_blocks.{n}.attn_qkv"] = [Target(name, 0, 3 * hidden)]
            elif rest in SINGLE_ONE_TO_ONE:
                aliases[base + SINGLE_ONE_TO_ONE[rest]] = [Target(name)]
    for root in roots:
        for bfl, diffusers_name in GLOBAL_ONE_TO_ONE.items():
            if root + bfl in ops:
                aliases[root + diffusers_name] = [Target(root + bfl)]
        final = root + FINAL_MOD[0]
        if final in ops:
            aliases[root + FINAL_MOD[1]] = _swapped_halves(final, ops[final].out_features // 2)
    return aliases, set()


def _qkv_targets(
    prefix: str, parts: tuple[str, ...], fused: str, ops: dict[str, LayerOp], use_fused: bool
) -> list[Target] | None:
    """q|k|v of a diffusers attention: its fused module whole, or rows spread over the split ones."""
    if use_fused and prefix + fused in ops:
        return [Target(prefix + fused)]
    names = [prefix + p for p in parts]
    if all(n in ops for n in names):
        return spread(names, [ops[n].out_features for n in names])
    return None


@provider
def diffusers_layout(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    """BFL/ComfyUI names (kohya ``lora_unet_double_blocks_…``, XLabs) on a diffusers Flux."""
    aliases: dict[str, list[Target]] = {}
    fused_attention = {n for n, m in model.named_modules() if getattr(m, "fused_projections", False)}
    blocks: dict[tuple[str, str, str], str] = {}
    for name in ops:
        m = _DIFFUSERS.match(name)
        if m:
            blocks[(m["root"], m["kind"], m["n"])] = name[: m.end()]
    for (root, kind, n), prefix in blocks.items():
        attn_fused = prefix + "attn" in fused_attention
        if kind == "transformer_blocks":
            bfl = f"{root}double_blocks.{n}."
            for rest, (parts, fused) in {
                "img_attn.qkv": (QKV, "attn.to_qkv"),
                "txt_attn.qkv": (ADDED_QKV, "attn.to_added_qkv"),
            }.items():
                targets = _qkv_targets(prefix, parts, fused, ops, attn_fused)
                if targets:
                    aliases[bfl + rest] = targets
            table = DOUBLE_ONE_TO_ONE
        else:
            bfl = f"{root}single_blocks.{n}."
            qkv = _qkv_targets(prefix, QKV, "attn.to_qkv", ops, attn_fused)
            mlp = prefix + "proj_mlp"
            if qkv and mlp in ops:
                width = sum(t.rows[1] if t.rows else ops[t.module].out_features for t in qkv)
                first = qkv if qkv[0].rows else [Target(qkv[0].module, rows=(0, width))]
                aliases[bfl + "linear1"] = [*first, Target(mlp, rows=(width, ops[mlp].out_features))]
                aliases[bfl + "attn_qkv"] = qkv
            table = SINGLE_ONE_TO_ONE
        for rest, diffusers_name in table.items():
            if prefix + diffusers_name in ops:
                aliases[bfl + rest] = [Target(prefix + diffusers_name)]
    for root in {r for r, _, _ in blocks}:
        for bfl, diffusers_name in GLOBAL_ONE_TO_ONE.items():
            if root + diffusers_name in ops:
                aliases[root + bfl] = [Target(root + diffusers_name)]
        final = root + FINAL_MOD[1]
        if final in ops:
            aliases[root + FINAL_MOD[0]] = _swapped_halves(final, ops[final].out_features // 2)
    return aliases, set()
