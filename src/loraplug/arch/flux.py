"""Flux: diffusers names and BFL / ComfyUI names, in both directions, sizes from real shapes.

BFL fuses what diffusers splits: double_blocks.N.img_attn.qkv = to_q | to_k | to_v,
txt_attn.qkv = add_q/k/v_proj, single_blocks.N.linear1 = to_q | to_k | to_v | proj_mlp; its final
modulation is (shift, scale) where diffusers' norm_out.linear is (scale, shift).
``single_blocks.N.attn_qkv`` names linear1's q|k|v part (XLabs' single-block "qkv_lora").
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from ..algorithms.op import LayerOp
from . import Target, provider
from .layouts import Group, aliases

QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
DOUBLE = {
    "img_attn.qkv": QKV,
    "txt_attn.qkv": ADDED_QKV,
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": (*QKV, "proj_mlp"),
    "attn_qkv": QKV,
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
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
_BLOCK = re.compile(
    r"^(?P<root>(?:.*\.)?)(?P<kind>double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)"
    r"\.(?P<n>\d+)\."
)
_DIFFUSERS_KIND = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_BFL_KIND = {v: k for k, v in _DIFFUSERS_KIND.items()}


def flux_groups(ops: dict[str, LayerOp]) -> list[Group]:
    """Every BFL <-> diffusers correspondence of the Flux blocks and globals found in ``ops``."""
    blocks = set()
    for name in ops:
        m = _BLOCK.match(name)
        if m:
            kind = _BFL_KIND.get(m["kind"], m["kind"])
            blocks.add((m["root"], kind, m["n"]))
    groups = []
    for root, kind, n in sorted(blocks):
        bfl, diffusers = f"{root}{kind}.{n}.", f"{root}{_DIFFUSERS_KIND[kind]}.{n}."
        for rest, parts in (DOUBLE if kind == "double_blocks" else SINGLE).items():
            sizes = None
            if rest == "linear1" and bfl + "linear1" in ops and bfl + "linear2" in ops:
                hidden = ops[bfl + "linear2"].out_features
                sizes = (hidden,) * 3 + (ops[bfl + "linear1"].out_features - 3 * hidden,)
            groups.append(Group(bfl + rest, tuple(diffusers + p for p in parts), sizes))
    for root in {r for r, _, _ in blocks}:
        groups += [Group(root + bfl, (root + d,)) for bfl, d in GLOBAL.items()]
        groups.append(Group(root + "final_layer.adaLN_modulation.1", (root + "norm_out.linear",), swap=True))
    return groups


@provider
def flux(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    found = aliases(flux_groups(ops), model, ops)
    for name in ops:  # a LoRA trained on diffusers' fused to_qkv, on a BFL model
        m = _BLOCK.match(name)
        if m and m["kind"] == "double_blocks" and name.endswith(("img_attn.qkv", "txt_attn.qkv")):
            fused = "attn.to_qkv" if name.endswith("img_attn.qkv") else "attn.to_added_qkv"
            found[f"{m['root']}transformer_blocks.{m['n']}.{fused}"] = [Target(name)]
        elif m and m["kind"] == "single_blocks" and name.endswith(".linear1"):
            qkv = found.get(f"{m['root']}single_transformer_blocks.{m['n']}.attn.to_v")
            if qkv:
                width = qkv[0].offset + qkv[0].size
                found[f"{m['root']}single_transformer_blocks.{m['n']}.attn.to_qkv"] = [Target(name, 0, width)]
                found[f"{m['root']}single_blocks.{m['n']}.attn_qkv"] = [Target(name, 0, width)]
    return found, set()


def widened_input_hint(module: str, in_features: int, tensors: dict[str, Tensor]) -> str:
    """What to tell a user whose adapter reads more channels than Flux's image-input embedding has:
    a Flux Control LoRA (Canny/Depth) widens that layer to take the control image's latents too
    ("" for any other module or mismatch)."""
    wider = any(
        t.ndim == 2 and t.shape[1] > in_features and t.shape[1] % in_features == 0 for t in tensors.values()
    )
    if module.rpartition(".")[2] not in ("img_in", "x_embedder") or not wider:
        return ""
    return (
        " This looks like a Flux Control LoRA (Canny/Depth: its image input also takes the control "
        "image's latents); it widens the model's input, which bypass does not do. Load it with "
        "diffusers' FluxControlPipeline.load_lora_weights (it widens the layer)."
    )
