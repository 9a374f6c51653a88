"""Patch: one adapter bound to one target (a module's output slice), as the runtime sees it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..adapters import Adapter
from ..algorithms.op import LayerOp
from ..errors import ShapeMismatchError


class BaseView:
    """What a patch may read of the base layer, for its output slice, computed lazily.

    ``weight()`` and ``bias()`` are float32 (dequantized where needed); ``output`` is the base
    layer's output slice (bias included); ``run(u)`` is W·u for this slice without bias, computed
    from the float weight, or through the module's own forward where the weight is quantized.
    """

    def __init__(
        self,
        weight: Callable[[], Tensor],
        bias: Callable[[], Tensor | None],
        run: Callable[[Tensor], Tensor],
        output: Tensor | None = None,
    ):
        self.weight = weight
        self.bias = bias
        self.run = run
        self.output = output

    def plain_output(self, channel_dim: int) -> Tensor:
        """The base output slice without its bias: W·x."""
        bias = self.bias()
        if bias is None:
            return self.output
        return self.output - channel_view(bias.to(self.output.dtype), self.output, channel_dim)


class Patch:
    """An adapter bound to a layer slice: ΔW(s) for merge, Δy(s) for bypass, s the strength.

    ``reads_base`` patches (DoRA, OFT, GLoRA…) read the base weight or output; the runtime runs
    them on the base output before anything is added. A ``diff_b`` tensor (bias diff) is handled
    here for every algorithm.
    """

    reads_base = False

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        self.key = adapter.key
        self.op = op
        self.out_features = out_features
        self._cache: dict[tuple, dict[str, Tensor]] = {}
        diff_b = adapter.tensors.get("diff_b")
        if diff_b is not None:
            self.check("diff_b", diff_b, (out_features,), "a bias diff of this slice")
        self.diff_b = None if diff_b is None else as_float32(diff_b)

    def tensors(self) -> dict[str, Tensor]:
        """The float tensors this patch computes with (canonical names)."""
        raise NotImplementedError

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        """W'(s) − W for this slice, float32, shaped like the weight slice."""
        raise NotImplementedError

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        """(W'(s) − W)·x for this slice, in x's dtype (bias diff excluded)."""
        raise NotImplementedError

    def low_rank(self, x: Tensor) -> tuple[Tensor, Tensor, float] | None:
        """(down (r, in), up (out, r), scale) in x's dtype when this patch is exactly
        scale · up ⋅ down on a linear layer, so the runtime may run it grouped with others."""
        return None

    def bias_delta(self, strength: float, bias: Tensor | None = None) -> Tensor | None:
        """b'(s) − b for this slice given its float base ``bias``, or None."""
        return None if self.diff_b is None else self.diff_b * strength

    def output_delta(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        """Everything this patch adds to the slice's output (broadcastable to it)."""
        delta = self.bypass(x, base, strength)
        if self.diff_b is not None:
            bias = self.tensors_like(x)["diff_b"] * strength.to(x.dtype)
            delta = delta + channel_view(bias, x, self.op.channel_dim)
        return delta

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.all_tensors().values())

    def all_tensors(self) -> dict[str, Tensor]:
        out = dict(self.tensors())
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return out

    def cast(self, x: Tensor) -> dict[str, Tensor]:
        """The tensors on x's device in x's dtype, not cached (``.to`` copies only if needed)."""
        return {k: t.to(device=x.device, dtype=x.dtype) for k, t in self.all_tensors().items()}

    def tensors_like(self, x: Tensor) -> dict[str, Tensor]:
        """The tensors on x's device in x's dtype; cached unless they are being trained."""
        if any(t.requires_grad for t in self.all_tensors().values()):
            return self.cast(x)
        slot = (x.device, x.dtype)
        if slot not in self._cache:
            self._cache[slot] = self.cast(x)
        return self._cache[slot]

    def check(self, name: str, tensor: Tensor, expected: tuple[int, ...], what: str) -> None:
        """Raise a ShapeMismatchError naming the key when ``tensor`` is not ``expected``."""
        if tuple(tensor.shape) != tuple(expected):
            self.fail(name, tensor, f"{what} needs {tuple(expected)}")

    def fail(self, name: str, tensor: Tensor, why: str) -> None:
        raise ShapeMismatchError(
            f"{self.key}: {name} has shape {tuple(tensor.shape)} but {why}. The adapter was made for "
            "a different model or layer; check that the file matches this base model."
        )


class DensePatch(Patch):
    """A patch whose bypass is the layer's own op on its dense ΔW(1), cached per device/dtype.

    For algorithms linear in strength with no cheaper factored form (or shapes where the dense
    form is cheaper): ΔW is built once, never per call; strength multiplies the output.
    """

    def unit_delta(self) -> Tensor:
        """ΔW at strength 1, float32."""
        raise NotImplementedError

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        return self.unit_delta() * strength

    def dense_like(self, x: Tensor) -> Tensor:
        slot = ("dense", x.device, x.dtype)
        if any(t.requires_grad for t in self.tensors().values()):
            return self.unit_delta().to(device=x.device, dtype=x.dtype)
        if slot not in self._cache:
            self._cache[slot] = {"dense": self.unit_delta().to(device=x.device, dtype=x.dtype)}
        return self._cache[slot]["dense"]

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        return self.op.run(x, self.dense_like(x)) * strength.to(x.dtype)


def channel_view(vector: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """``vector`` shaped to broadcast along ``channel_dim`` of ``like``."""
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return vector.reshape(shape)


def as_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def squeeze_pointwise(t: Tensor) -> Tensor:
    """(a, b, 1, 1…) -> (a, b); other shapes unchanged."""
    if t.dim() > 2 and all(s == 1 for s in t.shape[2:]):
        return t.reshape(t.shape[0], t.shape[1])
    return t
