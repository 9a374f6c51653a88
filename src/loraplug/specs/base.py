"""Patch: one adapter bound to one target (a module's output slice), as the runtime sees it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..adapters import Adapter
from ..algorithms.op import LayerOp
from ..errors import ShapeMismatchError


class BaseView:
    """What a patch may read of the base layer, for its output slice, computed lazily.

    ``weight()`` and ``bias()`` are float (dequantized where needed); ``output`` is the base
    layer's output slice, bias included.
    """

    def __init__(
        self,
        weight: Callable[[], Tensor],
        bias: Callable[[], Tensor | None],
        output: Tensor | None = None,
    ):
        self.weight = weight
        self.bias = bias
        self.output = output


class Patch:
    """An adapter bound to a layer: ΔW for merge, Δy for bypass; both linear in strength.

    Subclasses set ``needs_weight`` when they read the base weight (DoRA, OFT).
    """

    needs_weight = False

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        self.key = adapter.key
        self.op = op
        self.out_features = out_features
        self._cache: dict[tuple, dict[str, Tensor]] = {}

    def tensors(self) -> dict[str, Tensor]:
        """The float tensors this patch computes with (canonical names)."""
        raise NotImplementedError

    def delta_weight(self, weight: Tensor | None) -> Tensor:
        """ΔW at strength 1 for this slice, shaped like the weight slice, in float32."""
        raise NotImplementedError

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        """Δy = strength · (W' − W) x for this slice, in x's dtype."""
        raise NotImplementedError

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors_like(self, x: Tensor) -> dict[str, Tensor]:
        """The tensors on x's device in x's dtype; cached unless they are being trained."""
        tensors = self.tensors()
        if any(t.requires_grad for t in tensors.values()):
            return {k: t.to(device=x.device, dtype=x.dtype) for k, t in tensors.items()}
        slot = (x.device, x.dtype)
        if slot not in self._cache:
            self._cache[slot] = {k: t.to(device=x.device, dtype=x.dtype) for k, t in tensors.items()}
        return self._cache[slot]

    def check(self, name: str, tensor: Tensor, expected: tuple[int, ...], what: str) -> None:
        """Raise a ShapeMismatchError naming the key when ``tensor`` is not ``expected``."""
        if tuple(tensor.shape) != tuple(expected):
            raise ShapeMismatchError(
                f"{self.key}: {name} has shape {tuple(tensor.shape)} but {what} needs "
                f"{tuple(expected)}. The adapter was made for a different model or layer; "
                "check that the file matches this base model."
            )


def channel_view(vector: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """``vector`` shaped to broadcast along ``channel_dim`` of ``like``."""
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return vector.reshape(shape)


def as_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()
