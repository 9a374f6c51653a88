"""GLoRA glue: LyCORIS ``a1/a2/b1/b2(/bm).weight``."""

from __future__ import annotations

import math

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.glora import glora_input_delta
from ..algorithms.lora import lora_bypass, lora_delta_weight
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, Patch, squeeze_pointwise

NAMES = {"a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2", "bm.weight": "bm"}


class GloraPatch(Patch):
    """ΔW = scale·(W a1 a2 + b1 b2): the a-path runs the base weight on a2→a1 of x."""

    reads_base = True

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        t = {k: v for k, v in adapter.tensors.items() if k in NAMES.values()}
        self.a1, self.a2 = squeeze_pointwise(t["a1"]), squeeze_pointwise(t["a2"])
        self.b1, self.bm = squeeze_pointwise(t["b1"]), t.get("bm")
        self.b2 = squeeze_pointwise(t["b2"]) if self.bm is not None else t["b2"]
        rank = self.a2.shape[0]
        if op.groups != 1:
            self.fail("a1.weight", self.a1, "GLoRA needs an ungrouped layer")
        self.check("a1.weight", self.a1, (op.in_features, rank), "the input-side GLoRA term")
        self.check("a2.weight", self.a2, (rank, op.in_features), "the input-side GLoRA term")
        rb = self.b2.shape[0]
        self.check("b1.weight", self.b1, (out_features, rb), "the output-side GLoRA term")
        if op.is_conv and self.bm is None and self.b2.dim() == 2:
            self.b2 = self.b2.reshape(*self.b2.shape, *([1] * len(op.kernel)))
        if self.bm is not None:
            self.check("bm.weight", self.bm, (rb, rb, *op.kernel), "this kernel")
        elif op.is_conv:
            self.check("b2.weight", self.b2, (rb, op.in_features, *op.kernel), "this layer's input")
        else:
            self.check("b2.weight", self.b2, (rb, op.in_features), "this layer's input")
        self.scale = (adapter.alpha or rank) / (math.sqrt(rank) if adapter.rslora else rank)

    def tensors(self) -> dict[str, Tensor]:
        t = {"a1": self.a1, "a2": self.a2, "b1": self.b1, "b2": self.b2}
        if self.bm is not None:
            t["bm"] = self.bm
        return t

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        s = self.scale * strength
        t = {k: v.float() for k, v in self.tensors().items()}
        b = lora_delta_weight(t["b2"], t["b1"], t.get("bm"), s)
        return glora_input_delta(weight, t["a1"], t["a2"]) * s + b.reshape(weight.shape)

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        t = self.tensors_like(x)
        s = strength.to(x.dtype) * self.scale
        corrected = self.op.pointwise(self.op.pointwise(x, t["a2"]) * s, t["a1"])
        return base.run(corrected) + lora_bypass(x, t["b2"], t["b1"], t.get("bm"), s, self.op)


register(
    AlgorithmSpec(
        name="glora",
        suffixes=NAMES,
        identify=(frozenset({"a1", "a2", "b1", "b2"}),),
        build=GloraPatch,
        rank=lambda a: a.tensors["a2"].shape[0],
    )
)
