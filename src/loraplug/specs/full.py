"""Full-matrix diffs (``diff``) and bias-only diffs (``diff_b``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..adapters import Adapter
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, DensePatch, Patch, channel_view
from .norm import NormPatch


class FullPatch(DensePatch):
    """ΔW given densely; bypass runs the layer's op on it."""

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        shape = (out_features, op.in_features // op.groups, *op.kernel)
        diff = adapter.tensors["diff"]
        if diff.shape[0] != out_features or diff.numel() != math.prod(shape):
            self.fail("diff", diff, f"a full diff of this layer needs {shape}")
        self.diff = diff.reshape(shape)

    def tensors(self) -> dict[str, Tensor]:
        return {"diff": self.diff}

    def unit_delta(self) -> Tensor:
        return self.diff.float()


class BiasPatch(Patch):
    """A bias diff alone: ΔW = 0, the output moves by s·diff_b."""

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        return torch.zeros_like(weight)

    def output_delta(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        bias = self.tensors_like(x)["diff_b"] * strength.to(x.dtype)
        return channel_view(bias, x, self.op.channel_dim)


def _build_full(adapter: Adapter, op: LayerOp, out_features: int) -> Patch:
    """A diff of a norm layer's affine weight is a norm diff (ComfyUI and Wan LoRAs carry them)."""
    if op.kind == "norm":
        return NormPatch(adapter, op, out_features, name="diff")
    return FullPatch(adapter, op, out_features)


register(
    AlgorithmSpec(
        name="full",
        suffixes={"diff": "diff"},
        identify=(frozenset({"diff"}),),
        build=_build_full,
        layers=frozenset({"linear", "conv", "norm"}),
        row_dims=lambda a: {"diff": 0},
    )
)
register(
    AlgorithmSpec(
        name="bias",
        suffixes={},
        identify=(frozenset({"diff_b"}),),
        build=BiasPatch,
        layers=frozenset({"linear", "conv", "norm"}),
        fallback=True,
        row_dims=lambda a: {},
    )
)
