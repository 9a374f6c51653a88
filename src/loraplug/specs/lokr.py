"""LoKr glue: ``lokr_w1``/``lokr_w1_a``/``lokr_w1_b``/``lokr_w2``/``lokr_w2_a``/``lokr_w2_b``/``lokr_t2``."""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.lokr import lokr_bypass, lokr_delta_weight, lokr_factor, lokr_w2_dense
from ..algorithms.lora import lora_bypass
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, DensePatch, Patch
from .dora import with_dora

NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lokr_rank(t: dict) -> int | None:
    """The low rank of a decomposed factor (w1b or w2b's first dim), None if both are full."""
    for name in ("lokr_w1_b", "lokr_w2_b"):
        if name in t:
            return t[name].shape[0]
    return None


class LokrPatch(DensePatch):
    """Kronecker product w1 ⊗ w2; bypass in factored form (x split into (c, d) channels)."""

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        self.t = {n: adapter.tensors[n] for n in NAMES if n in adapter.tensors}
        t = self.t
        w1 = lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
        a, c = w1.shape
        b = (
            t["lokr_w2"].shape[0]
            if "lokr_w2" in t
            else (t["lokr_w2_a"].shape[1] if "lokr_t2" in t else t["lokr_w2_a"].shape[0])
        )
        in_per_group = op.in_features // op.groups
        if a * b != out_features or in_per_group % c:
            self.check(
                "lokr_w1 ⊗ lokr_w2",
                w1.new_empty(a * b, c),
                (out_features, in_per_group),
                f"a Kronecker factorisation of ({out_features}, {in_per_group})",
            )
        self.sub_op = dataclasses.replace(op, out_features=b, in_features=in_per_group // c, groups=1)
        self.w2_shape = (b, in_per_group // c, *op.kernel)
        dense_w2 = lokr_w2_dense(
            t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"), op.kernel
        )
        self.check(
            "lokr_w2", dense_w2.reshape(b, -1), (b, math.prod(self.w2_shape[1:])), "this layer's input"
        )
        self.shape = (out_features, in_per_group, *op.kernel)
        # LyCORIS: scale 1 when both factors are full; PEFT: alpha / r from its config, always.
        rank = lokr_rank(t) or adapter.config_rank
        self.scale = (
            1.0 if rank is None else (adapter.alpha or rank) / (math.sqrt(rank) if adapter.rslora else rank)
        )

    def tensors(self) -> dict[str, Tensor]:
        return self.t

    def unit_delta(self) -> Tensor:
        t = {k: v.float() for k, v in self.t.items()}
        w1 = lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
        w2 = lokr_w2_dense(
            t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"), self.op.kernel
        )
        return lokr_delta_weight(w1, w2.reshape(self.w2_shape), self.scale).reshape(self.shape)

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        if self.op.groups != 1:
            return super().bypass(x, base, strength)
        t = self.tensors_like(x)
        w1 = lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
        w1 = w1 * (strength.to(x.dtype) * self.scale)
        sub = self.sub_op
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].reshape(self.w2_shape)
            return lokr_bypass(x, w1, lambda z: sub.run(z, w2), self.op)
        if "lokr_t2" in t:
            down, mid, up = t["lokr_w2_b"], t["lokr_t2"], t["lokr_w2_a"].T
        else:
            down, mid, up = t["lokr_w2_b"].reshape(-1, *self.w2_shape[1:]), None, t["lokr_w2_a"]
        return lokr_bypass(x, w1, lambda z: lora_bypass(z, down, up, mid, 1.0, sub), self.op)


def _build(adapter: Adapter, op: LayerOp, out_features: int) -> Patch:
    return with_dora(adapter, op, out_features, LokrPatch(adapter, op, out_features))


_W1 = (frozenset({"lokr_w1"}), frozenset({"lokr_w1_a", "lokr_w1_b"}))
_W2 = (frozenset({"lokr_w2"}), frozenset({"lokr_w2_a", "lokr_w2_b"}))
register(
    AlgorithmSpec(
        name="lokr",
        suffixes={n: n for n in NAMES},
        identify=tuple(a | b for a in _W1 for b in _W2),
        build=_build,
        rank=lambda a: lokr_rank(a.tensors),
    )
)
