"""Correspondences between diffusers module names and another layout (BFL, ComfyUI, ldm), used in
both directions: on a model in the other layout the diffusers names become aliases (slices of its
fused modules); on a diffusers model the other names become aliases (an adapter's output rows
spread over the split modules, or the fused module where fuse_qkv_projections() made one)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..algorithms.op import LayerOp
from . import Target, split, spread

FUSED_TRIPLES = {
    ("to_q", "to_k", "to_v"): "to_qkv",
    ("add_q_proj", "add_k_proj", "add_v_proj"): "to_added_qkv",
}


@dataclass(frozen=True)
class Group:
    """One module of the other layout and the diffusers modules it holds, in output order.

    ``sizes`` gives their widths in the other module (None: equal parts); ``swap`` says the other
    module is the single part with its two output halves exchanged (shift/scale vs scale/shift).
    """

    other: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    swap: bool = False


def swapped_halves(module: str, half: int) -> list[Target]:
    """Output halves exchanged: the adapter's rows [0:h] go to [h:2h] and back."""
    return [Target(module, half, half, rows=(0, half)), Target(module, 0, half, rows=(half, half))]


def aliases(groups: Iterable[Group], model: nn.Module, ops: dict[str, LayerOp]) -> dict[str, list[Target]]:
    """Aliases for whichever side of each group the model lacks."""
    fused_parents = {n for n, m in model.named_modules() if getattr(m, "fused_projections", False)}
    out: dict[str, list[Target]] = {}
    for g in groups:
        if g.other in ops:
            out.update(_into_other(g, ops))
        else:
            targets = _into_diffusers(g, ops, fused_parents)
            if targets:
                out[g.other] = targets
    return out


def _into_other(g: Group, ops: dict[str, LayerOp]) -> dict[str, list[Target]]:
    total = ops[g.other].out_features
    if g.swap:
        return {g.parts[0]: swapped_halves(g.other, total // 2)}
    if len(g.parts) == 1:
        return {g.parts[0]: [Target(g.other)]}
    sizes = list(g.sizes or [total // len(g.parts)] * len(g.parts))
    return split(g.other, list(g.parts), sizes)


def _fused_module(parts: tuple[str, ...], ops: dict[str, LayerOp], fused_parents: set[str]) -> str | None:
    """The fused module that replaced these three split projections, if fuse_qkv_projections ran."""
    prefix, _, _ = parts[0].rpartition(".")
    names = tuple(p.rpartition(".")[2] for p in parts)
    fused = FUSED_TRIPLES.get(names)
    if fused and prefix in fused_parents and all(p.rpartition(".")[0] == prefix for p in parts):
        candidate = f"{prefix}.{fused}"
        return candidate if candidate in ops else None
    return None


def _into_diffusers(g: Group, ops: dict[str, LayerOp], fused_parents: set[str]) -> list[Target] | None:
    if g.swap:
        part = g.parts[0]
        return swapped_halves(part, ops[part].out_features // 2) if part in ops else None
    modules, sizes, i = [], [], 0
    while i < len(g.parts):
        fused = _fused_module(g.parts[i : i + 3], ops, fused_parents) if i + 3 <= len(g.parts) else None
        name = fused or g.parts[i]
        if name not in ops:
            return None
        modules.append(name)
        sizes.append(ops[name].out_features)
        i += 3 if fused else 1
    if len(modules) == 1:
        return [Target(modules[0])]
    return spread(modules, sizes)
