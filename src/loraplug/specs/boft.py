"""BOFT glue: LyCORIS butterfly OFT (``oft_blocks`` (m, n, b, b), ``rescale``, ``alpha``)."""

from __future__ import annotations

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.oft import butterfly, toward_identity
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
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


register(
    AlgorithmSpec(
        name="boft",
        suffixes={"oft_blocks": "oft_blocks", "rescale": "rescale"},
        identify=(frozenset({"oft_blocks"}),),
        build=BoftPatch,
        rank=lambda a: a.tensors["oft_blocks"].shape[-1],
        accepts=lambda tensors: tensors["oft_blocks"].dim() == 4,
    )
)
