"""SD1.5 / SDXL UNets: diffusers names and the original ldm names (``input_blocks.N.1…``), both ways.

The block numbering of the ldm layout follows from the number of resnets per level, read from
whichever layout the model has; everything else is one module to one module.
"""

from __future__ import annotations

import re

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, provider
from .layouts import Group, aliases

RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
ATTENTION = ("norm", "proj_in", "proj_out")
TRANSFORMER = (
    "norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip
BASIC = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
MAX_DEPTH = 16  # transformer blocks per attention (SDXL uses up to 10)


def _resnets_per_level(ops: dict[str, LayerOp], root: str) -> list[int] | None:
    """Resnets in each down level, from the diffusers or the ldm names."""
    counts: dict[int, set[int]] = {}
    for name in ops:
        m = re.match(rf"^{re.escape(root)}down_blocks\.(\d+)\.resnets\.(\d+)\.", name)
        if m:
            counts.setdefault(int(m[1]), set()).add(int(m[2]))
    if counts:
        return [len(counts[x]) for x in sorted(counts)]
    blocks = sorted(
        {int(m[1]) for n in ops if (m := re.match(rf"^{re.escape(root)}input_blocks\.(\d+)\.0\.", n))}
    )
    downs = {int(m[1]) for n in ops if (m := re.match(rf"^{re.escape(root)}input_blocks\.(\d+)\.0\.op$", n))}
    levels, current = [], 0
    for n in (b for b in blocks if b > 0):  # block 0 is conv_in
        if n in downs:
            levels.append(current)
            current = 0
        else:
            current += 1
    return [*levels, current] if blocks else None


def _attention(other: str, diffusers: str) -> list[Group]:
    groups = [Group(f"{other}.{b}", (f"{diffusers}.{b}",)) for b in ATTENTION]
    return groups + [
        Group(f"{other}.transformer_blocks.{t}.{b}", (f"{diffusers}.transformer_blocks.{t}.{b}",))
        for t in range(MAX_DEPTH)
        for b in TRANSFORMER
    ]


def unet_groups(root: str, resnets: list[int]) -> list[Group]:
    groups = [Group(root + o, (root + d,)) for o, d in BASIC.items()]
    for x, count in enumerate(resnets):
        n = 1 + (count + 1) * x
        for i in range(count):
            ldm, diff = f"{root}input_blocks.{n}", f"{root}down_blocks.{x}"
            groups += [Group(f"{ldm}.0.{o}", (f"{diff}.resnets.{i}.{d}",)) for o, d in RESNET.items()]
            groups += _attention(f"{ldm}.1", f"{diff}.attentions.{i}")
            n += 1
        groups.append(Group(f"{root}input_blocks.{n}.0.op", (f"{root}down_blocks.{x}.downsamplers.0.conv",)))
    groups += _attention(f"{root}middle_block.1", f"{root}mid_block.attentions.0")
    for i, n in enumerate((0, 2)):
        groups += [
            Group(f"{root}middle_block.{n}.{o}", (f"{root}mid_block.resnets.{i}.{d}",))
            for o, d in RESNET.items()
        ]
    for x, count in enumerate(reversed(resnets)):
        n = (count + 1) * x
        for i in range(count + 1):
            ldm, diff = f"{root}output_blocks.{n}", f"{root}up_blocks.{x}"
            groups += [Group(f"{ldm}.0.{o}", (f"{diff}.resnets.{i}.{d}",)) for o, d in RESNET.items()]
            groups += _attention(f"{ldm}.1", f"{diff}.attentions.{i}")
            if i == count:  # the upsampler follows the resnet (and the attention, when there is one)
                for c in (1, 2):
                    groups.append(Group(f"{ldm}.{c}.conv", (f"{diff}.upsamplers.0.conv",)))
            n += 1
    return groups


_MARKER = re.compile(
    r"^(?P<root>(?:.*\.)?)(?:down_blocks\.0\.resnets\.0\.conv1|input_blocks\.1\.0\.in_layers\.2)$"
)


@provider
def unet(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    found: dict[str, list[Target]] = {}
    for name in ops:
        m = _MARKER.match(name)
        if m:
            resnets = _resnets_per_level(ops, m["root"])
            if resnets:
                found.update(aliases(unet_groups(m["root"], resnets), model, ops))
    return found, set()
