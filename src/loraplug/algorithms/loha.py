"""LoHa: ΔW = scale · (w1a ⋅ w1b) ⊙ (w2a ⋅ w2b), each half optionally through a Tucker core.

Shapes (out, in, r, k as in lora.py):
    plain:  w1a, w2a (out, r)    w1b, w2b (r, in·∏k)
    Tucker: w1a, w2a (r, out)    w1b, w2b (r, in)      t1, t2 (r, r, *k)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _half(wa: Tensor, wb: Tensor, t: Tensor | None) -> Tensor:
    if t is None:
        return wa @ wb
    return torch.einsum("ij...,jr,ip->pr...", t, wb, wa)


def loha_delta_weight(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    t1: Tensor | None,
    t2: Tensor | None,
    scale: float,
    shape: tuple[int, ...],
) -> Tensor:
    """The dense ΔW, reshaped to the layer's weight ``shape``."""
    return (_half(w1a, w1b, t1) * _half(w2a, w2b, t2) * scale).reshape(shape)


def loha_as_lora(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> tuple[Tensor, Tensor]:
    """(up, down) with up ⋅ down = (w1a ⋅ w1b) ⊙ (w2a ⋅ w2b): the face-splitting identity gives a
    rank r1·r2 factorisation, so the bypass never needs the dense ΔW."""
    out = w1a.shape[0]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, -1)
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return up, down
