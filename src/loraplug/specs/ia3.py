"""(IA)^3 glue: a scale vector on the output rows or the input columns.

LyCORIS stores ``weight`` + ``on_input`` and means W' = W ⊙ (1 + w), bias untouched. PEFT stores
``ia3_l`` and means W' = W ⊙ l, and on the output axis scales the bias too (its merge does); the
axis is the config's ``feedforward_modules`` (input) or the tensor's shape.
"""

from __future__ import annotations

from torch import Tensor

from ..adapters import Adapter, matches_modules
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, Patch, as_float32, channel_view


def _peft_on_input(adapter: Adapter, l_shape: tuple[int, ...], out_features: int) -> bool:
    if "feedforward_modules" in adapter.config:
        return matches_modules(adapter.config["feedforward_modules"], adapter.key)
    return not (l_shape[0] == out_features and all(s == 1 for s in l_shape[1:]))


class Ia3Patch(Patch):
    """W'(s) = W ⊙ (1 + s·f) along one axis, f = w (LyCORIS) or l − 1 (PEFT)."""

    reads_base = True

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        t = adapter.tensors
        if "ia3_l" in t:
            self.on_input = _peft_on_input(adapter, tuple(t["ia3_l"].shape), out_features)
            self.f = as_float32(t["ia3_l"].reshape(-1)) - 1
            self.scales_bias = not self.on_input
        else:
            self.on_input = bool(t["on_input"].reshape(-1)[0])
            self.f = as_float32(t["weight"].reshape(-1))
            self.scales_bias = False
        size = op.in_features // op.groups if self.on_input else out_features
        self.check("scale vector", self.f, (size,), "an (IA)^3 scale of this layer")

    def tensors(self) -> dict[str, Tensor]:
        return {"f": self.f}

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        shape = [1] * weight.dim()
        shape[1 if self.on_input else 0] = -1
        return weight * (self.f.reshape(shape) * strength)

    def bias_delta(self, strength: float, bias: Tensor | None = None) -> Tensor | None:
        own = super().bias_delta(strength, bias)
        if not self.scales_bias or bias is None:
            return own
        scaled = bias * self.f * strength
        return scaled if own is None else scaled + own

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        f = self.tensors_like(x)["f"] * strength.to(x.dtype)
        cdim = self.op.channel_dim
        if self.on_input:
            return base.run(x * channel_view(f, x, cdim))
        out = base.output if self.scales_bias else base.plain_output(cdim)
        return out * channel_view(f, out, cdim)


register(
    AlgorithmSpec(
        name="ia3",
        suffixes={"weight": "weight", "on_input": "on_input", "ia3_l": "ia3_l"},
        identify=(frozenset({"weight", "on_input"}), frozenset({"ia3_l"})),
        build=Ia3Patch,
    )
)
