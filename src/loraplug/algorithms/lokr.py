"""LoKr: ΔW = scale · w1 ⊗ w2, each factor full or low rank (w1a⋅w1b, w2a⋅w2b, Tucker t2).

Shapes: w1 (a, c); w2 (b, d, *k); the layer has out = a·b, in = c·d.
    w1 low rank:  w1a (a, r)  w1b (r, c)
    w2 low rank:  w2a (b, r)  w2b (r, d·∏k)
    w2 Tucker:    w2a (r, b)  w2b (r, d)   t2 (r, r, *k)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .op import LayerOp


def lokr_factor(full: Tensor | None, a: Tensor | None, b: Tensor | None) -> Tensor:
    """w1 (or a plain w2) as a dense matrix: the full tensor or a ⋅ b."""
    return full if full is not None else a @ b


def lokr_w2_dense(
    w2: Tensor | None, w2a: Tensor | None, w2b: Tensor | None, t2: Tensor | None, kernel: tuple[int, ...]
) -> Tensor:
    """w2 as a dense (b, d, *k) tensor."""
    if w2 is not None:
        return w2
    if t2 is not None:
        return torch.einsum("ij...,jr,ip->pr...", t2, w2b, w2a)
    return (w2a @ w2b).reshape(w2a.shape[0], -1, *kernel)


def lokr_delta_weight(w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """kron(w1, w2) · scale, shaped (a·b, c·d, *k)."""
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1, w2.contiguous()) * scale


def lokr_bypass(x: Tensor, w1: Tensor, w2_apply, op: LayerOp) -> Tensor:
    """(w1 ⊗ w2) x in factored form: split x's channels into (c, d), apply w2 on d (in the layer's
    geometry) through ``w2_apply``, then mix the c groups with w1. Never builds the dense ΔW."""
    a, c = w1.shape
    if not op.is_conv:
        z = w2_apply(x.unflatten(-1, (c, -1)))  # (..., c, b)
        return torch.einsum("ac,...cb->...ab", w1, z).flatten(-2)
    n = x.shape[0]
    z = w2_apply(x.reshape(n * c, -1, *x.shape[2:]))  # (n·c, b, *S)
    z = z.reshape(n, c, *z.shape[1:])
    return torch.einsum("ac,ncb...->nab...", w1, z).flatten(1, 2)
