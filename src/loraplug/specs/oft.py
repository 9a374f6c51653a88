"""OFT glue: LyCORIS diag-OFT (``oft_blocks`` (n, b, b), ``rescale``, ``alpha`` = constraint) and
the shared machinery of output rotations (BOFT reuses it with another rotation)."""

from __future__ import annotations

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.oft import cayley, rotate_blocks, rows_first, rows_last, toward_identity
from ..algorithms.op import LayerOp
from . import AlgorithmSpec, register
from .base import BaseView, Patch, as_float32


class RotationPatch(Patch):
    """W'(s) = rescale_s ⊙ rotate_s(W) on the rows of this slice; bypass rotates y − b.

    Subclasses give ``rotate(z, rotations, strength)`` on the last dim and ``rotations()``.
    """

    reads_base = True

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        self.blocks = as_float32(adapter.tensors["oft_blocks"])
        rescale = adapter.tensors.get("rescale")
        if rescale is not None:
            self.check("rescale", rescale.reshape(-1), (out_features,), "a per-row rescale")
        self.rescale = None if rescale is None else as_float32(rescale.reshape(-1))
        self.constraint = float(adapter.alpha or 0.0) * out_features
        self._rotation_cache: dict[tuple, Tensor] = {}

    def tensors(self) -> dict[str, Tensor]:
        t = {"oft_blocks": self.blocks}
        if self.rescale is not None:
            t["rescale"] = self.rescale
        return t

    def rotate(self, z: Tensor, rotations: Tensor, strength) -> Tensor:
        raise NotImplementedError

    def rotations(self, like: Tensor) -> Tensor:
        """The Cayley rotations in ``like``'s dtype/device, cached unless being trained."""
        if self.blocks.requires_grad:
            return cayley(self.blocks.to(like.device), self.constraint).to(like.dtype)
        slot = (like.device, like.dtype)
        if slot not in self._rotation_cache:
            self._rotation_cache[slot] = cayley(self.blocks.to(like.device), self.constraint).to(like.dtype)
        return self._rotation_cache[slot]

    def _apply(self, z: Tensor, strength) -> Tensor:
        """rescale_s ⊙ rotate_s(z) − z on the last dim."""
        out = self.rotate(z, self.rotations(z), strength)
        if self.rescale is not None:
            out = out * (1 + (self.rescale.to(z) - 1) * strength)
        return out - z

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        return rows_first(self._apply(rows_last(weight), strength))

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        plain = base.plain_output(self.op.channel_dim)
        z = plain.movedim(self.op.channel_dim, -1)
        return self._apply(z, strength.to(z.dtype)).movedim(-1, self.op.channel_dim)


class OftPatch(RotationPatch):
    """Block-diagonal OFT: each of n blocks of b rows rotated by R_k, toward I with strength."""

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        n, b, b2 = self.blocks.shape
        if n * b != out_features or b != b2:
            self.fail("oft_blocks", self.blocks, f"square blocks must cover the {out_features} rows")

    def rotate(self, z: Tensor, rotations: Tensor, strength) -> Tensor:
        return rotate_blocks(z, toward_identity(rotations, strength))


def _is_block_stack(tensors: dict) -> bool:
    return tensors["oft_blocks"].dim() == 3


register(
    AlgorithmSpec(
        name="oft",
        suffixes={"oft_blocks": "oft_blocks", "rescale": "rescale"},
        identify=(frozenset({"oft_blocks"}),),
        build=OftPatch,
        rank=lambda a: a.tensors["oft_blocks"].shape[-1],
        accepts=_is_block_stack,
    )
)
