"""BOFT glue: LyCORIS butterfly OFT (``oft_blocks`` (m, n, b, b), ``rescale``, ``alpha``)."""

from __future__ import annotations

import math

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.oft import butterfly, peft_butterfly_matrix, toward_identity
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, Patch, as_float32, channel_view
from .oft import RotationPatch


class BoftPatch(RotationPatch):
    """m butterfly stages of n·b-row rotations; strength moves each stage toward I (as LyCORIS)."""

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        m, n, b, b2 = self.blocks.shape
        if n * b != out_features or b != b2 or b % 2:
            self.fail("oft_blocks", self.blocks, f"even square blocks must cover the {out_features} rows")

    def rotate(self, z: Tensor, rotations: Tensor, strength) -> Tensor:
        return butterfly(z, toward_identity(rotations, strength))


class PeftBoftPatch(Patch):
    """PEFT BOFT (``boft_R``, ``boft_s``): W' = diag(boft_s) ⋅ W ⋅ Mᵀ, M the butterfly rotation of
    the (flattened) input; strength interpolates the weight linearly."""

    reads_base = True

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        self.blocks = as_float32(adapter.tensors["boft_R"])
        self.scale = as_float32(adapter.tensors["boft_s"].reshape(-1))
        self.check("boft_s", self.scale, (out_features,), "a per-row BOFT scale")
        m, d, b, _ = self.blocks.shape
        self.n = (op.in_features // op.groups) * math.prod(op.kernel)
        if d * b != self.n:
            self.fail("boft_R", self.blocks, f"its {d} blocks of {b} must cover the {self.n} inputs")
        self._matrix: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {"boft_R": self.blocks, "boft_s": self.scale}

    def matrix(self) -> Tensor:
        if self.blocks.requires_grad:
            return peft_butterfly_matrix(self.blocks, self.n)
        if self._matrix is None:
            self._matrix = peft_butterfly_matrix(self.blocks, self.n)
        return self._matrix

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        rotated = (flat @ self.matrix().to(flat.device).T) * self.scale.to(flat.device)[:, None]
        return ((rotated - flat) * strength).reshape(weight.shape)

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        if self.op.is_conv:
            delta = self.delta_weight(base.weight(), 1.0).to(x.dtype)
            return self.op.run(x, delta) * strength.to(x.dtype)
        m = self.matrix().to(device=x.device, dtype=x.dtype)
        cdim = self.op.channel_dim
        rotated = base.run(x @ m) * channel_view(self.scale.to(x), x, cdim)
        return (rotated - base.plain_output(cdim)) * strength.to(x.dtype)


def _build(adapter: Adapter, op: LayerOp, out_features: int) -> Patch:
    if "boft_R" in adapter.tensors:
        return PeftBoftPatch(adapter, op, out_features)
    return BoftPatch(adapter, op, out_features)


register(
    AlgorithmSpec(
        name="boft",
        suffixes={"oft_blocks": "oft_blocks", "rescale": "rescale", "boft_R": "boft_R", "boft_s": "boft_s"},
        identify=(frozenset({"oft_blocks"}), frozenset({"boft_R", "boft_s"})),
        build=_build,
        rank=lambda a: (a.tensors.get("oft_blocks", a.tensors.get("boft_R"))).shape[-1],
        accepts=lambda tensors: "boft_R" in tensors or tensors["oft_blocks"].dim() == 4,
    )
)
