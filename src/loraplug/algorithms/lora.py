"""LoRA / LoCon: ΔW = scale · up @ down, optionally through a Tucker core ``mid``.

Shapes (out = output features, in = input features, r = rank, k = kernel dims):
    linear:        down (r, in)            up (out, r)
    conv (LoCon):  down (r, in, *k)        up (out, r, 1…)
    conv (Tucker): down (r, in, 1…)        mid (r, r, *k)       up (out, r, 1…)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .op import LayerOp


def lora_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """alpha / rank (alpha / sqrt(rank) for rsLoRA); no alpha means alpha = rank."""
    alpha = float(rank) if alpha is None else float(alpha)
    return alpha / (math.sqrt(rank) if rslora else rank)


def lora_delta_weight(down: Tensor, up: Tensor, mid: Tensor | None, scale: float) -> Tensor:
    """The dense ΔW = scale · up ⋅ (mid ⋅) down, shaped (out, in, *k)."""
    out_dim, in_dim = up.shape[0], down.shape[1]
    up2 = up.reshape(out_dim, -1)
    if mid is None:
        kernel = down.shape[2:]
        delta = up2 @ down.reshape(down.shape[0], -1)
    else:
        kernel = mid.shape[2:]
        delta = torch.einsum("ij...,oi,jn->on...", mid, up2, down.reshape(down.shape[0], -1))
    return (delta * scale).reshape(out_dim, in_dim, *kernel)


def lora_bypass(
    x: Tensor, down: Tensor, up: Tensor, mid: Tensor | None, scale: Tensor | float, op: LayerOp
) -> Tensor:
    """h(x) = up(scale · mid(down(x))) in the layer's own geometry.

    ``scale`` multiplies the rank-sized hidden activation, the cheapest place to apply it.
    """
    if mid is None:
        hidden = op.run(x, down)
    else:
        hidden = op.run(op.pointwise(x, down), mid)
    return op.pointwise(hidden * scale, up)


def lora_resize(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(down (rank, in·∏k), up (out, rank)) whose product is the best rank-``rank`` approximation
    of ``delta`` (out, in, *k) (truncated SVD, singular values split evenly between the factors)."""
    flat = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root
