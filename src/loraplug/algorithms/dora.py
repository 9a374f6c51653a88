"""DoRA weight decomposition: W_dora = m · (W + ΔW) / ‖W + ΔW‖ on one axis.

The magnitude ``m`` is stored per output row (PEFT; LyCORIS ``wd_on_out=True``: shape (out,) or
(out, 1, …)) or per input column (LyCORIS ``wd_on_out=False``: shape (1, in, 1, …)).
Strength s interpolates the weight linearly: W' = W + s · (W_dora − W), so s = 0 is the base.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dora_on_output(dora_scale: Tensor, out_features: int) -> bool:
    """For a LyCORIS ``dora_scale``: True when per output row (out, 1, …), False when per input
    column (1, in, …)."""
    return dora_scale.dim() == 1 or (dora_scale.shape[0] == out_features and dora_scale.shape[1] == 1)


def dora_factor(merged: Tensor, magnitude: Tensor, on_output: bool) -> Tensor:
    """m / ‖merged‖ shaped to broadcast against ``merged`` (out, in, *k)."""
    view = [1] * merged.dim()
    if on_output:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        view[0] = merged.shape[0]
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        view[1] = merged.shape[1]
    norm = norm + torch.finfo(norm.dtype).eps
    return magnitude.reshape(view) / norm.reshape(view)


def dora_delta_weight(weight: Tensor, delta: Tensor, magnitude: Tensor, on_output: bool) -> Tensor:
    """W_dora − W for the float base ``weight`` and the adapter's dense ``delta``."""
    merged = weight + delta
    return merged * dora_factor(merged, magnitude, on_output) - weight


def dora_output_bypass(factor: Tensor, base_out: Tensor, h: Tensor, channel_dim: int) -> Tensor:
    """Δy for per-row DoRA: (r − 1) ⊙ W x + r ⊙ ΔW x, with r = ``factor`` per output channel.

    ``base_out`` is W x without bias; ``h`` is ΔW x.
    """
    shape = [1] * base_out.dim()
    shape[channel_dim] = -1
    r = factor.reshape(shape)
    return (r - 1) * base_out + r * h
