"""Norm-layer diffs (LyCORIS ``w_norm`` / ``b_norm``): W' = W + s·w_norm on LayerNorm, GroupNorm
and RMSNorm affine weights (b_norm is read as the bias diff)."""

from __future__ import annotations

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, Patch, as_float32


class NormPatch(Patch):
    """Δy = s · w_norm ⊙ normalise(x) (+ s · b_norm). ``name``: the tensor holding the weight diff
    (LyCORIS ``w_norm``; a full ``diff`` on a norm layer means the same)."""

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int, name: str = "w_norm"):
        super().__init__(adapter, op, out_features)
        w = adapter.tensors[name]
        self.check(name, w, (out_features,), "a norm-layer weight diff")
        self.name, self.w = name, as_float32(w)

    def tensors(self) -> dict[str, Tensor]:
        return {self.name: self.w}

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        return self.w * strength

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        return self.op.run(x, self.tensors_like(x)[self.name] * strength.to(x.dtype))


register(
    AlgorithmSpec(
        name="norm",
        suffixes={"w_norm": "w_norm"},
        identify=(frozenset({"w_norm"}),),
        build=NormPatch,
        layers=frozenset({"norm"}),
    )
)
