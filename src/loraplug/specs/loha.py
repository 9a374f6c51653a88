"""LoHa glue: LyCORIS / kohya / PEFT ``hada_*`` keys."""

from __future__ import annotations

import math

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.loha import loha_as_lora, loha_delta_weight
from ..algorithms.lora import lora_bypass, lora_scale
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, DensePatch, Patch
from .dora import with_dora

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


class LohaPatch(DensePatch):
    """Hadamard product of two low-rank updates; factored bypass when rank r1·r2 is cheaper."""

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        self.t = {n: adapter.tensors[n] for n in NAMES if n in adapter.tensors}
        self.tucker = "hada_t1" in self.t
        rank = self.t["hada_w1_b"].shape[0]
        self.shape = (out_features, op.in_features // op.groups, *op.kernel)
        fan_in = math.prod(self.shape[1:])
        if self.tucker:
            for i in "12":
                self.check(f"hada_w{i}_a", self.t[f"hada_w{i}_a"], (rank, out_features), "a Tucker LoHa")
                self.check(f"hada_w{i}_b", self.t[f"hada_w{i}_b"], (rank, self.shape[1]), "a Tucker LoHa")
                self.check(f"hada_t{i}", self.t[f"hada_t{i}"], (rank, rank, *op.kernel), "this kernel")
        else:
            for i in "12":
                r = self.t[f"hada_w{i}_b"].shape[0]
                self.check(
                    f"hada_w{i}_a",
                    self.t[f"hada_w{i}_a"].reshape(out_features, -1),
                    (out_features, r),
                    f"a rank-{r} LoHa of {out_features} outputs",
                )
                self.t[f"hada_w{i}_b"] = self.t[f"hada_w{i}_b"].reshape(r, -1)
                self.check(f"hada_w{i}_b", self.t[f"hada_w{i}_b"], (r, fan_in), "this layer's input")
        self.scale = lora_scale(adapter.alpha, rank, adapter.rslora)
        r12 = self.t["hada_w1_b"].shape[0] * self.t["hada_w2_b"].shape[0]
        self.factored = (
            not self.tucker and op.groups == 1 and r12 * (fan_in + out_features) < fan_in * out_features
        )

    def tensors(self) -> dict[str, Tensor]:
        return self.t

    def unit_delta(self) -> Tensor:
        t = {k: v.float() for k, v in self.t.items()}
        return loha_delta_weight(
            t["hada_w1_a"],
            t["hada_w1_b"],
            t["hada_w2_a"],
            t["hada_w2_b"],
            t.get("hada_t1"),
            t.get("hada_t2"),
            self.scale,
            self.shape,
        )

    def low_rank(self, x: Tensor) -> tuple[Tensor, Tensor, float] | None:
        if not self.factored or self.op.kind != "linear" or self.diff_b is not None:
            return None
        t = self.cast(x)
        up, down = loha_as_lora(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"])
        return down, up, self.scale

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        if not self.factored:
            return super().bypass(x, base, strength)
        t = self.tensors_like(x)
        up, down = loha_as_lora(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"])
        down = down.reshape(down.shape[0], *self.shape[1:])
        return lora_bypass(x, down, up, None, strength.to(x.dtype) * self.scale, self.op)


def _build(adapter: Adapter, op: LayerOp, out_features: int) -> Patch:
    return with_dora(adapter, op, out_features, LohaPatch(adapter, op, out_features))


register(
    AlgorithmSpec(
        name="loha",
        suffixes={n: n for n in NAMES},
        identify=(frozenset(NAMES[:4]),),
        build=_build,
        rank=lambda a: a.tensors["hada_w1_b"].shape[0],
        row_dims=lambda a: None if "hada_t1" in a.tensors else {"hada_w1_a": 0, "hada_w2_a": 0},
    )
)
