"""(IA)^3 glue: LyCORIS ``weight`` + ``on_input`` (a scale vector on the output or input axis)."""

from __future__ import annotations

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, Patch, as_float32, channel_view


class Ia3Patch(Patch):
    """W'(s) = W ⊙ (1 + s·w) along the output rows (or input columns when ``on_input``)."""

    reads_base = True

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        self.on_input = bool(adapter.tensors["on_input"].reshape(-1)[0])
        self.w = as_float32(adapter.tensors["weight"].reshape(-1))
        size = op.in_features // op.groups if self.on_input else out_features
        self.check("weight", self.w, (size,), "an (IA)^3 scale of this layer")

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.w}

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        axis = 1 if self.on_input else 0
        shape = [1] * weight.dim()
        shape[axis] = -1
        return weight * (self.w.reshape(shape) * strength)

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        w = self.tensors_like(x)["weight"] * strength.to(x.dtype)
        cdim = self.op.channel_dim
        if self.on_input:
            return base.run(x * channel_view(w, x, cdim))
        plain = base.plain_output(cdim)
        return plain * channel_view(w, plain, cdim)


register(
    AlgorithmSpec(
        name="ia3",
        suffixes={"weight": "weight", "on_input": "on_input"},
        identify=(frozenset({"weight", "on_input"}),),
        build=Ia3Patch,
    )
)
