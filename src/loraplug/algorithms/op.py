"""The base layer's linear map, as data: enough to run a weight the way the layer runs its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerOp:
    """How a Linear or ConvNd layer applies its weight (bias excluded).

    ``kernel`` is () for linear layers. ``channel_dim`` is where output features live in the
    layer's output: -1 for linear, 1 for convolutions.
    """

    out_features: int
    in_features: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    pad_before: tuple[int, ...] = ()
    pad_mode: str = "zeros"
    norm: str = ""  # "layer", "group" or "rms" for normalisation layers
    eps: float | None = 1e-5

    @property
    def kind(self) -> str:
        """'linear', 'conv' or 'norm' (what an algorithm may adapt)."""
        return "norm" if self.norm else ("conv" if self.kernel else "linear")

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def channel_dim(self) -> int:
        return 1 if self.is_conv or self.norm == "group" else -1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features // self.groups, *self.kernel)

    def run(self, x: Tensor, weight: Tensor) -> Tensor:
        """x through ``weight`` with the layer's own geometry (stride, padding, dilation, groups);
        for a norm layer, the normalised x scaled by ``weight``."""
        if self.norm:
            shape = [-1] + [1] * (x.dim() - 2) if self.norm == "group" else [-1]
            return self.normalize(x) * weight.reshape(shape)
        if not self.is_conv:
            return F.linear(x, weight)
        padding = self.padding
        if self.pad_mode != "zeros":
            x = F.pad(x, self.pad_before, mode=self.pad_mode)
            padding = 0
        conv = _CONV[len(self.kernel)]
        return conv(x, weight, None, self.stride, padding, self.dilation, self.groups)

    def normalize(self, x: Tensor) -> Tensor:
        """x normalised as the norm layer does it, before its affine weight and bias."""
        if self.norm == "group":
            return F.group_norm(x, self.groups, None, None, self.eps)
        if self.norm == "rms":
            return F.rms_norm(x, (self.in_features,), None, self.eps)
        return F.layer_norm(x, (self.in_features,), None, None, self.eps or 1e-5)

    def pointwise(self, x: Tensor, weight: Tensor) -> Tensor:
        """x through a 1x1 (or linear) ``weight``: no geometry, features on ``channel_dim``."""
        if not self.is_conv:
            return F.linear(x, weight)
        weight = weight.reshape(*weight.shape[:2], *([1] * len(self.kernel)))
        return _CONV[len(self.kernel)](x, weight)


def layer_op(module: nn.Module) -> LayerOp | None:
    """The LayerOp of a Linear/ConvNd-like module, or None when it is neither.

    Subclasses (quantized Linear wrappers, ComfyUI's ops) count as their base class.
    """
    if isinstance(module, nn.Linear):
        return LayerOp(module.out_features, module.in_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(
        module, nn.modules.conv._ConvTransposeNd
    ):
        return LayerOp(
            out_features=module.out_channels,
            in_features=module.in_channels,
            kernel=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
            pad_before=tuple(module._reversed_padding_repeated_twice),
            pad_mode=module.padding_mode,
        )
    return _norm_op(module)


def _norm_op(module: nn.Module) -> LayerOp | None:
    """LayerNorm / RMSNorm over one dim, GroupNorm, when they carry an affine weight."""
    if getattr(module, "weight", None) is None:
        return None
    if isinstance(module, nn.GroupNorm):
        c = module.num_channels
        return LayerOp(c, c, groups=module.num_groups, norm="group", eps=module.eps)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(module.normalized_shape) == 1:
        c = module.normalized_shape[0]
        return LayerOp(c, c, norm="rms" if isinstance(module, nn.RMSNorm) else "layer", eps=module.eps)
    return None


def float_dtype(dtype: torch.dtype) -> bool:
    """True for the dtypes adapter math may run in (fp64/32/16, bf16)."""
    return dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
