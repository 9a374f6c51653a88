"""Quantized base weights: how to read each kind in float, and how to write a merged weight back in
the same scheme (the support table is in ``loraplug.quant``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..algorithms.op import float_dtype
from ..errors import UnsupportedModuleError
from ..fp8 import quantize_per_row

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Backend:
    """One weight storage: ``dequantize(module)`` -> float32 weight; ``requantize(module, w)`` ->
    the module attributes that hold ``w`` in the same scheme (None: cannot be written back)."""

    name: str
    detect: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], Tensor]
    requantize: Callable[[nn.Module, Tensor], dict[str, Tensor]] | None

    def __reduce__(self):
        return _backend_named, (self.name,)  # pickled by name (its functions are lambdas)


def _type_name(w) -> str:
    return type(w).__name__


def _torchao_requantize(module: nn.Module, merged: Tensor) -> dict[str, Tensor]:
    from torchao.quantization.granularity import PerRow, PerTensor

    w = module.weight
    block = tuple(w.block_size)
    granularity = PerTensor() if block == tuple(w.shape) else PerRow() if block[0] == 1 else None
    if granularity is None:
        raise UnsupportedModuleError(f"torchao block size {block} cannot be requantized; use mode='bypass'.")
    merged = merged.to(w.dtype)
    if _type_name(w) == "Float8Tensor":
        new = type(w).from_hp(merged, float8_dtype=w.qdata.dtype, granularity=granularity, mm_config=w.mm_config,
                              act_quant_kwargs=w.act_quant_kwargs, kernel_preference=w.kernel_preference)  # fmt: skip
    else:
        new = type(w).from_hp(merged, granularity=granularity, act_quant_kwargs=w.act_quant_kwargs)
    return {"weight": nn.Parameter(new, requires_grad=False)}


def _quanto_requantize(module: nn.Module, merged: Tensor) -> dict[str, Tensor]:
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    w = module.weight
    scale = AbsmaxOptimizer()(merged, w.qtype, w.axis)
    new = quantize_weight(merged.to(w.dtype), qtype=w.qtype, axis=w.axis, scale=scale.to(w.dtype))
    return {"weight": nn.Parameter(new, requires_grad=False)}


def _gguf_dequantize(module: nn.Module) -> Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(module.weight).float()


def _gguf_requantize(module: nn.Module, merged: Tensor) -> dict[str, Tensor]:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    qtype = module.weight.quant_type
    data = gguf.quants.quantize(merged.detach().cpu().numpy(), qtype)
    return {"weight": GGUFParameter(torch.from_numpy(data).to(module.weight.device), quant_type=qtype)}


def fp8_scaled(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """fp8 weight and its per-tensor scale (max |w| maps to the format's largest value)."""
    scale = weight.abs().max().clamp(min=1e-12) / torch.finfo(dtype).max
    return (weight / scale).to(dtype), scale


def fp8_saturated(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 weight with no scale to change: values beyond the format's range saturate."""
    limit = torch.finfo(dtype).max
    return weight.clamp(-limit, limit).to(dtype)


def _scaled_fp8_requantize(module: nn.Module, merged: Tensor) -> dict[str, Tensor]:
    weight, scale = fp8_scaled(merged, module.weight.dtype)
    old = module.scale_weight
    new_scale = scale.reshape(old.shape).to(old.dtype)
    return {"weight": nn.Parameter(weight, requires_grad=False),
            "scale_weight": nn.Parameter(new_scale, requires_grad=False) if isinstance(old, nn.Parameter) else new_scale}  # fmt: skip


def _rowwise_fp8_requantize(module: nn.Module, merged: Tensor) -> dict[str, Tensor]:
    weight, scale = quantize_per_row(merged, module.weight.dtype)
    return {
        "weight": nn.Parameter(weight, requires_grad=False),
        "weight_scale": scale.to(module.weight_scale.dtype),
    }


def _rowwise_fp8(m: nn.Module) -> bool:
    s = getattr(m, "weight_scale", None)
    return (
        _plain(m.weight) and m.weight.dtype in FP8 and isinstance(s, Tensor) and s.shape == m.weight.shape[:1]
    )


def _plain_fp8_requantize(module: nn.Module, merged: Tensor) -> dict[str, Tensor]:
    return {"weight": nn.Parameter(fp8_saturated(merged, module.weight.dtype), requires_grad=False)}


def _bnb_dequantize(module: nn.Module) -> Tensor:
    import bitsandbytes.functional as bnbf

    w = module.weight
    if _type_name(w) == "Params4bit":
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    return (
        (w.data.float() * module.state.SCB.float()[:, None] / 127)
        if getattr(module, "state", None) is not None and module.state.SCB is not None
        else w.float()
    )  # noqa: E501


def _plain(w) -> bool:
    return isinstance(w, Tensor) and type(w.data) is Tensor


BACKENDS = [
    Backend("float", lambda m: _plain(m.weight) and float_dtype(m.weight.dtype), lambda m: m.weight.detach().float(), None),
    Backend("fp8 per-row", _rowwise_fp8, lambda m: m.weight.detach().float() * m.weight_scale.detach().float()[:, None],
            _rowwise_fp8_requantize),
    Backend("scaled fp8", lambda m: _plain(m.weight) and m.weight.dtype in FP8 and isinstance(getattr(m, "scale_weight", None), Tensor),
            lambda m: m.weight.detach().float() * m.scale_weight.detach().float(), _scaled_fp8_requantize),
    Backend("fp8", lambda m: _plain(m.weight) and m.weight.dtype in FP8, lambda m: m.weight.detach().float(), _plain_fp8_requantize),
    Backend("torchao", lambda m: _type_name(m.weight) in ("Int8Tensor", "Float8Tensor"),
            lambda m: m.weight.dequantize().detach().float(), _torchao_requantize),
    Backend("quanto qbytes", lambda m: _type_name(m.weight) == "WeightQBytesTensor",
            lambda m: m.weight.dequantize().detach().float(), _quanto_requantize),
    Backend("quanto", lambda m: _type_name(m.weight).startswith("WeightQ"), lambda m: m.weight.dequantize().detach().float(), None),
    Backend("gguf", lambda m: _type_name(m.weight) == "GGUFParameter", _gguf_dequantize, _gguf_requantize),
    Backend("bitsandbytes", lambda m: _type_name(m.weight) in ("Params4bit", "Int8Params"), _bnb_dequantize, None),
]  # fmt: skip


def _backend_named(name: str) -> Backend:
    return next(b for b in BACKENDS if b.name == name)


def backend_of(module: nn.Module) -> Backend | None:
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        return None
    return next((b for b in BACKENDS if b.detect(module)), None)


def is_float_weight(module: nn.Module) -> bool:
    """True when the weight is a plain float tensor that can be written in place."""
    backend = backend_of(module)
    return backend is not None and backend.name == "float"


def float_weight(module: nn.Module, name: str) -> Tensor:
    """The module's weight as a float32 tensor (dequantized by its backend)."""
    backend = backend_of(module)
    if backend is None:
        if hasattr(module.weight, "dequantize"):
            return module.weight.dequantize().detach().float()
        w = module.weight
        raise UnsupportedModuleError(
            f"{name}: weight is {type(w).__name__} of dtype {w.dtype}, which loraplug cannot read in float. "
            "This adapter needs the base weight (DoRA-style); use a plain LoRA, or a float base."
        )
    return backend.dequantize(module)


def float_bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().to(torch.float32)
