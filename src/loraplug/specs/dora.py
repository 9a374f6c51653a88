"""DoRA glue: wraps any additive patch whose adapter carries a magnitude (``dora_scale`` or PEFT's
``lora_magnitude_vector``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import Adapter
from ..algorithms.dora import dora_delta_weight, dora_factor, dora_on_output, dora_output_bypass
from ..algorithms.op import LayerOp
from .base import BaseView, Patch, as_float32, channel_view


class DoraPatch(Patch):
    """W_dora = m · (W + ΔW) / ‖W + ΔW‖, strength interpolating linearly from W.

    Needs W in float: the runtime hands a dequantized, cached copy of the slice. The factor
    m / ‖W + ΔW‖ is computed once per base weight and reused while W is unchanged.
    """

    reads_base = True

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int, inner: Patch):
        super().__init__(adapter, op, out_features)
        self.inner = inner
        if "magnitude" in adapter.tensors:  # PEFT: per output row whatever its shape
            magnitude, self.on_output = adapter.tensors["magnitude"], True
        else:
            magnitude = adapter.tensors["dora_scale"]
            self.on_output = dora_on_output(magnitude, out_features)
        if self.on_output:
            self.check("dora_scale", magnitude.reshape(-1), (out_features,), "a per-row magnitude")
        else:
            self.check(
                "dora_scale", magnitude.reshape(-1), (op.in_features // op.groups,), "a per-column magnitude"
            )
        self.magnitude = as_float32(magnitude.reshape(-1))
        self._factor_key: tuple | None = None
        self._factor: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {**self.inner.tensors(), "dora_scale": self.magnitude}

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        unit = self.inner.delta_weight(weight, 1.0)
        return dora_delta_weight(weight, unit, self.magnitude, self.on_output) * strength

    def factor(self, weight: Tensor) -> Tensor:
        """m / ‖W + ΔW‖ as a vector (per row or per column), cached per base weight version."""
        key = (weight.data_ptr(), weight._version, weight.device, weight.shape)
        if self.magnitude.requires_grad or key != self._factor_key:
            merged = weight + self.inner.delta_weight(weight, 1.0).to(weight.device)
            factor = dora_factor(merged, self.magnitude.to(weight.device), self.on_output).reshape(-1)
            if self.magnitude.requires_grad:
                return factor
            self._factor_key, self._factor = key, factor
        return self._factor

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        weight = base.weight()
        factor = self.factor(weight).to(x.dtype)
        one = torch.ones((), dtype=x.dtype)
        cdim = self.op.channel_dim
        bias = base.bias()
        plain = (
            base.output if bias is None else base.output - channel_view(bias.to(x.dtype), base.output, cdim)
        )
        if self.on_output:
            h = self.inner.bypass(x, base, one)
            return dora_output_bypass(factor, plain, h, cdim) * strength.to(x.dtype)
        scaled_x = x * channel_view(factor, x, cdim)
        rescaled = self.op.run(scaled_x, weight.to(x.dtype))
        return (rescaled - plain + self.inner.bypass(scaled_x, base, one)) * strength.to(x.dtype)


def with_dora(adapter: Adapter, op: LayerOp, out_features: int, patch: Patch) -> Patch:
    """``patch`` wrapped in DoRA when the adapter carries a magnitude."""
    if "dora_scale" in adapter.tensors or "magnitude" in adapter.tensors:
        return DoraPatch(adapter, op, out_features, patch)
    return patch
