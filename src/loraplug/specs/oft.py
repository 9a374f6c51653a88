"""OFT glue: LyCORIS diag-OFT (``oft_blocks`` (n, b, b), ``rescale``, ``alpha`` = constraint) and
the shared machinery of output rotations (BOFT reuses it with another rotation)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import Adapter
from ..algorithms.oft import (
    cayley,
    cayley_neumann,
    coft_project,
    rotate_blocks,
    rotate_input_blocks,
    rows_first,
    rows_last,
    skew_from_packed,
    toward_identity,
)
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


class PeftOftPatch(Patch):
    """PEFT OFT (``oft_R.weight``): block rotations of the *input*, W' = W ⋅ blockdiag(R)ᵀ.

    R is PEFT's Cayley(-Neumann) rotation of packed skew entries (COFT-projected if configured);
    strength interpolates the weight linearly. Linear layers only: PEFT's convolution variant
    rotates unfolded patches, which no weight merge reproduces.
    """

    reads_base = True

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        if op.is_conv:
            self.fail(
                "oft_R.weight",
                adapter.tensors["oft_R"],
                "PEFT OFT on convolutions rotates unfolded patches and is not supported; "
                "use LyCORIS OFT or merge it with PEFT",
            )
        packed = as_float32(adapter.tensors["oft_R"])
        config = adapter.config
        block = int(config.get("oft_block_size") or 0) or int(
            round((1 + (1 + 8 * packed.shape[1]) ** 0.5) / 2)
        )
        if block * (block - 1) // 2 != packed.shape[1] or op.in_features % block:
            self.fail("oft_R.weight", packed, f"blocks of {block} must tile the {op.in_features} inputs")
        if config.get("coft"):
            packed = coft_project(packed, block, float(config.get("eps", 6e-5)))
        n = op.in_features // block
        if packed.shape[0] not in (1, n) or (
            packed.shape[0] == 1 and n > 1 and not config.get("block_share")
        ):
            self.check("oft_R.weight", packed, (n, packed.shape[1]), f"{n} blocks of {block} inputs")
        self.packed, self.block, self.n = packed, block, n
        use_neumann = config.get("use_cayley_neumann", True)
        self.terms = int(config.get("num_cayley_neumann_terms", 5)) if use_neumann else 0

    def tensors(self) -> dict[str, Tensor]:
        return {"oft_R": self.packed}

    def rotation(self) -> Tensor:
        r = cayley_neumann(skew_from_packed(self.packed, self.block), self.terms)
        return r.expand(self.n, -1, -1) if r.shape[0] == 1 else r

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        rotated = torch.einsum("onk,nck->onc", weight.unflatten(-1, (self.n, self.block)), self.rotation())
        return (rotated.flatten(-2) - weight) * strength

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        r = self.rotation().to(device=x.device, dtype=x.dtype)
        return base.run(rotate_input_blocks(x, r) - x) * strength.to(x.dtype)


def _build(adapter: Adapter, op: LayerOp, out_features: int) -> Patch:
    if "oft_R" in adapter.tensors:
        return PeftOftPatch(adapter, op, out_features)
    return OftPatch(adapter, op, out_features)


def _accepts(tensors: dict) -> bool:
    return "oft_R" in tensors or tensors["oft_blocks"].dim() == 3


register(
    AlgorithmSpec(
        name="oft",
        suffixes={"oft_blocks": "oft_blocks", "rescale": "rescale", "oft_R.weight": "oft_R"},
        identify=(frozenset({"oft_blocks"}), frozenset({"oft_R"})),
        build=_build,
        rank=lambda a: a.tensors["oft_blocks"].shape[-1] if "oft_blocks" in a.tensors else None,
        accepts=_accepts,
    )
)
