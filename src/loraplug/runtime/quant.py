"""How to read a module's weight in float, whatever it is stored as."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algorithms.op import float_dtype
from ..errors import UnsupportedModuleError


def is_float_weight(module: nn.Module) -> bool:
    """True when the weight is a plain float tensor that can be written in place."""
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and type(w.data) is Tensor and float_dtype(w.dtype)


def float_weight(module: nn.Module, name: str) -> Tensor:
    """The module's weight as a float32 tensor (dequantized when the weight type allows it)."""
    w = module.weight
    if float_dtype(w.dtype) and type(w.data) is Tensor:
        return w.detach().float()
    if hasattr(w, "dequantize"):
        return w.dequantize().detach().float()
    raise UnsupportedModuleError(
        f"{name}: weight is {type(w).__name__} of dtype {w.dtype}, which loraplug cannot read in float. "
        "This adapter needs the base weight (DoRA-style); use a plain LoRA, or a float base."
    )


def float_bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().to(torch.float32)
