"""A frozen ``nn.Linear`` plus its trained low-rank adapters as one differentiable call of plain
GEMMs (any device and float dtype): y = x·Wᵀ + bias + (x·D)·U, with D (K, R) the stacked downs (their
scales folded in) and U (R, N) the ups (block-diagonal over q/k/v slices).

What autograd alone would do differently: the two parts of dx (dy·W and g·Dᵀ) came out of two GEMMs
and one more pass over dx added them; here the base GEMM accumulates into the adapters' part (cuBLAS
reads it in its epilogue), forward and backward. Under torch.compile both halves are operators, opaque
to Inductor: its functionalization would copy an accumulated output before the GEMM writes it."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_LIB = torch.library.Library("loraplug", "FRAGMENT")


def watched() -> bool:
    """Whether something watches the operator calls: a graph being compiled, or a dispatch mode
    (selective activation checkpointing keeps an operator's outputs instead of running it again,
    and would see an in-place change to a kept GEMM output as an error; fake tensors). Then an
    opaque registered operator is called, where eager mode calls the plain functions."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor
) -> tuple[Tensor, Tensor]:
    """(y, h): h = x·D, y = h·U + bias, then x·Wᵀ accumulated into y."""
    h = torch.mm(x, down)
    y = torch.mm(h, up) if bias is None else torch.addmm(bias, h, up)
    return y.addmm_(x, weight.t()), h


def backward(dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, down: Tensor, up: Tensor,
             need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """(dx or None, dD, dU) for ``forward``'s output gradient dy: g = dy·Uᵀ, dD = xᵀ·g, dU = hᵀ·dy,
    dx = g·Dᵀ with dy·W accumulated into it. dD and dU are transposed views of row-major dDᵀ and
    dUᵀ: D and U are transposed views of the adapters' parameters, so each parameter's gradient
    arrives in the parameter's own layout and autograd stores it without a copy per step."""
    g = torch.mm(dy, up.t())
    dx = torch.mm(g, down.t()).addmm_(dy, weight) if need_dx else None
    return dx, torch.mm(g.t(), x).t(), torch.mm(dy.t(), h).t()


def define_pair(
    lib: torch.library.Library, name: str, schemas: tuple[str, str], impls: tuple, fakes: tuple
) -> None:
    """Operators ``name`` and ``name_backward`` (schemas without the name; eager implementations;
    shapes for tracing), opaque to Inductor: what they compute runs as written."""
    for op, schema, impl, fake in zip((name, f"{name}_backward"), schemas, impls, fakes, strict=True):
        lib.define(op + schema)
        lib.impl(op, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"loraplug::{op}", fake, lib=lib)


def _forward_shapes(x, weight, bias, down, up):
    return x.new_empty(x.shape[0], up.shape[1]), x.new_empty(x.shape[0], down.shape[1])


def _backward_shapes(dy, x, weight, h, down, up, need_dx):
    dx = dy.new_empty(dy.shape[0], x.shape[1]) if need_dx else None
    return dx, x.new_empty(down.shape[::-1]).t(), x.new_empty(up.shape[::-1]).t()


# An operator's name changes with its contract (v2: dD and dU transposed in memory): Inductor's
# on-disk cache keys compiled graphs by operator names, not by the shapes their fakes give.
define_pair(
    _LIB,
    "lora_under_base_v2",
    (
        "(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up) -> (Tensor, Tensor)",
        "(Tensor dy, Tensor x, Tensor weight, Tensor h, Tensor down, Tensor up, bool need_dx) "
        "-> (Tensor?, Tensor, Tensor)",
    ),
    (forward, backward),
    (_forward_shapes, _backward_shapes),
)


class LoraUnderBase(torch.autograd.Function):
    """``forward`` differentiable in x, D and U (the base weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up):
        y, h = (torch.ops.loraplug.lora_under_base_v2 if watched() else forward)(x, weight, bias, down, up)
        ctx.save_for_backward(x, weight, h, down, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, h, down, up = ctx.saved_tensors
        call = torch.ops.loraplug.lora_under_base_v2_backward if torch.compiler.is_compiling() else backward
        dx, d_down, d_up = call(dy, x, weight, h, down, up, ctx.needs_input_grad[0])
        return dx, None, None, d_down, d_up
