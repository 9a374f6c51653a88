"""GLoRA (LyCORIS): ΔW = scale · (W ⋅ a1 ⋅ a2 + b1 ⋅ b2).

The a-path acts on the input side of the base weight: (W a1 a2) x = W (a1 (a2 x)), so the bypass
runs the base weight on a rank-r correction of x; the b-path is a LoCon (b2 may carry the kernel,
bm a Tucker core).
Shapes: a1 (in, r, 1…), a2 (r, in, 1…), b1 (out, r, 1…), b2 (r, in, *k) or (r, in, 1…) with bm.
"""

from __future__ import annotations

import torch
from torch import Tensor


def glora_input_delta(weight: Tensor, a1: Tensor, a2: Tensor) -> Tensor:
    """W ⋅ a1 ⋅ a2 on the input channels of a (out, in, *k) weight."""
    a1 = a1.reshape(a1.shape[0], -1)
    a2 = a2.reshape(a2.shape[0], -1)
    return torch.einsum("oi...,ij,jn->on...", weight, a1, a2)
