"""fp8 base layers: e4m3 weights with one scale per output row, activations quantized per token at
run time (dynamic), the product in fp8 on the tensor cores (``torch._scaled_mm``, Hopper/Ada).

``quantize_fp8(model)`` swaps the ``nn.Linear`` layers it selects for ``Fp8Linear``; bypass adapters
then run beside them, and on CUDA with Triton the down projection joins the activation quantization
and the up projection the fp8 GEMM (one read of x, one write of y). On the CPU, or a GPU without fp8
matrix units, the same arithmetic is emulated in float32 (slow, for tests).

    >>> import torch, loraplug as lp
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    >>> lp.quantize_fp8(model)
    1
    >>> type(model[0]).__name__
    'Fp8Linear'
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor, nn

from .errors import LoraplugError
from .runtime import kernels
from .runtime.kernels import E4M3


def quantize_per_row(t: Tensor, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """(fp8 values, float32 scale per row) of a 2-D tensor: each row's max |t| maps to the format's
    largest value (weights per output row, activations per token)."""
    t = t.detach().float()
    limit = torch.finfo(dtype).max
    scale = t.abs().amax(dim=1).clamp(min=1e-12) / limit
    return (t / scale[:, None]).clamp(-limit, limit).to(dtype), scale


def fp8_matmul_on(device: torch.device) -> bool:
    """The device has fp8 matrix units (Ada, Hopper and later)."""
    return cuda_capability(device) >= (8, 9)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, (0, 0) for any other. Cached in eager mode; read directly
    while compiling (Dynamo folds it to a constant, and warns about a cache wrapper it ignores)."""
    if device.type != "cuda":
        return (0, 0)
    read = _read_capability if torch.compiler.is_compiling() else _capability
    return read(device.index)


def _read_capability(index: int | None) -> tuple[int, int]:
    # get_device_properties: torch.compile folds it to a constant (get_device_capability broke the
    # graph at every fp8 layer, the custom autograd function included)
    props = torch.cuda.get_device_properties(index)
    return props.major, props.minor


_capability = functools.cache(_read_capability)


class Fp8Linear(nn.Linear):
    """y = (x quantized per token) · (W quantized per row)ᵀ in fp8, rescaled, + bias, in x's dtype.

    A Linear (so every tool that looks for Linear layers finds it) whose ``weight`` is e4m3 with a
    float32 ``weight_scale`` per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=E4M3, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q, s = quantize_per_row(linear.weight)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = s
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # frozen base inside a trained model
            return _Fp8Function.apply(x, self.weight, self.weight_scale, self.bias)
        return fp8_forward(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3 per-row"


def fp8_forward(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The fp8 layer alone (no adapters; with them the bypass runner calls the fused kernel) on
    any device: Triton kernels (one quantization pass, then the fp8 GEMM) in eager mode and, on
    Hopper and later, inside torch.compile graphs (``kernels.here``); ``torch._scaled_mm`` in
    graphs before Hopper (Inductor fuses the quantization) or without Triton; else the float32
    emulation."""
    x2 = x.reshape(-1, x.shape[-1])
    if not fp8_matmul_on(x.device):
        return fp8_linear_reference(x2, weight, weight_scale, bias).to(x.dtype).view(*x.shape[:-1], -1)
    bias = None if bias is None else bias.to(x.dtype)
    if (
        kernels.available()
        and kernels.here(cuda_capability(x.device))
        and kernels.supports(x2.shape[1], weight.shape[0])
    ):
        y = kernels.lora_linear(
            x2.contiguous(), weight, bias, None, None, None, None, None, None, weight_scale, x.dtype
        )
    else:
        q, s = quantize_per_row(x2)
        y = torch._scaled_mm(
            q, weight.t(), scale_a=s[:, None], scale_b=weight_scale[None, :], bias=bias, out_dtype=x.dtype
        )
    return y.view(*x.shape[:-1], weight.shape[0])


class _Fp8Function(torch.autograd.Function):
    """Gradient to the input only (the fp8 weight is frozen): dL/dx = dL/dy · W, in the
    gradient's dtype with the weight dequantized for the product."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias):
        ctx.save_for_backward(weight, weight_scale)
        return fp8_forward(x, weight, weight_scale, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        dense = weight.to(grad.dtype) * weight_scale.to(grad.dtype)[:, None]
        return grad @ dense, None, None, None


def fp8_linear_reference(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The fp8 layer's arithmetic in float32 (the oracle for the kernels, and the CPU path)."""
    q, s = quantize_per_row(x)
    y = (q.float() * s[:, None]) @ (weight.float() * weight_scale[:, None]).T
    return y if bias is None else y + bias.float()


def quantize_fp8(model: nn.Module, targets: str | None = None) -> int:
    """Replace the ``nn.Linear`` layers of ``model`` whose qualified names match the regular
    expression ``targets`` (default: every Linear) by ``Fp8Linear``; returns how many.
    All-or-nothing: on an error the model is as it was."""
    try:
        pattern = re.compile(targets) if targets else None
    except re.error as err:
        raise LoraplugError(f"targets={targets!r} is not a regular expression ({err}).") from None
    swaps = [
        (parent, child_name, f"{parent_name}.{child_name}".lstrip("."), child)
        for parent_name, parent in model.named_modules()
        for child_name, child in parent.named_children()
        if type(child) is nn.Linear
        and (pattern is None or pattern.search(f"{parent_name}.{child_name}".lstrip(".")))
    ]
    for _, _, name, child in swaps:
        if child.weight.device.type == "meta":
            raise LoraplugError(f"{name}: weights are on the meta device; load them before quantize_fp8.")
    layers = [Fp8Linear.from_linear(child) for *_, child in swaps]
    for (parent, child_name, _, _), layer in zip(swaps, layers, strict=True):
        setattr(parent, child_name, layer)
    return len(swaps)
