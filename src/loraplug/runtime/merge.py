"""Merge mode: W = W₀ + Σ sᵢ · ΔWᵢ(W₀), always recomputed from the original bytes W₀.

The original weight is kept once per module; removing the last merge copies those bytes back, so
``remove()`` restores the model bit-identically (nothing is ever subtracted back). A quantized weight
is dequantized, merged and requantized in its own scheme (runtime.quant), and on removal the
original tensor objects are put back.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..arch import Target
from ..errors import UnsupportedModuleError
from ..specs.base import Patch
from .quant import backend_of


@dataclass(eq=False)
class MergeEntry:
    patch: Patch
    target: Target
    strength: float


class ModuleMerge:
    """The original bytes of one module's weight and the merges applied over them."""

    def __init__(self, module: nn.Module, name: str):
        self.module_ref = weakref.ref(module)
        self.name = name
        self.backend = backend_of(module)
        self.in_place = self.backend.name == "float"
        if self.in_place:
            self.original = module.weight.detach().clone()
        else:  # quantized: keep the very objects to put back, merge from their dequantized values
            self.saved = {
                a: getattr(module, a)
                for a in ("weight", "scale_weight", "weight_scale")
                if hasattr(module, a)
            }
            self.original = self.backend.dequantize(module)
        bias = getattr(module, "bias", None)
        self.original_bias = None if bias is None else bias.detach().clone()
        self.entries: list[MergeEntry] = []

    def __getstate__(self) -> dict:
        """Pickled with a merge handle (its model's merged weights travel in the model): the
        module in place of the weak reference."""
        return {**self.__dict__, "module_ref": self.module_ref()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        module = state["module_ref"]
        self.module_ref = weakref.ref(module)
        _ACTIVE[module] = self

    def refresh(self) -> None:
        """Rewrite weight (and bias) from the original bytes and the current entries."""
        module = self.module_ref()
        active = [e for e in self.entries if e.strength != 0]
        with torch.no_grad():
            if not active:
                if self.in_place:
                    module.weight.copy_(self.original)
                else:
                    for attr, value in self.saved.items():
                        setattr(module, attr, value)
                if self.original_bias is not None:
                    module.bias.copy_(self.original_bias)
                return
            base = self.original.float()
            merged = base.clone()
            bias = None if self.original_bias is None else self.original_bias.float().clone()
            for e in active:
                part = _narrow(merged, e.target)
                delta = e.patch.delta_weight(_narrow(base, e.target), e.strength)
                part.add_(delta.to(part.device).reshape(part.shape))
                base_bias = None if bias is None else _narrow(self.original_bias, e.target).float()
                bias_delta = e.patch.bias_delta(e.strength, base_bias)
                if bias_delta is not None:
                    _narrow(bias, e.target).add_(bias_delta.to(bias.device))
            if self.in_place:
                module.weight.copy_(merged.to(module.weight.dtype))
            else:
                for attr, value in self.backend.requantize(module, merged).items():
                    setattr(module, attr, value)
            if bias is not None:
                module.bias.copy_(bias.to(module.bias.dtype))


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, ModuleMerge] = weakref.WeakKeyDictionary()


def _narrow(t: Tensor, target: Target) -> Tensor:
    return t if target.size is None else t.narrow(0, target.offset, target.size)


def check_mergeable(module: nn.Module, name: str, patches: list[Patch]) -> None:
    """Raise before anything is touched when the weight (or bias) cannot be merged into."""
    if any(p.diff_b is not None for p in patches) and getattr(module, "bias", None) is None:
        raise UnsupportedModuleError(
            f"{name}: the adapter carries a bias diff (diff_b) but the layer has no bias to merge it "
            "into. Use mode='bypass', which adds it to the output."
        )
    backend = backend_of(module)
    if backend is None or (backend.name != "float" and backend.requantize is None):
        w = module.weight
        kind = backend.name if backend else f"{type(w).__name__}/{w.dtype}"
        raise UnsupportedModuleError(
            f"{name}: a {kind} weight cannot be requantized after merging. Use mode='bypass', which runs "
            "adapters beside quantized weights without touching them."
        )


def attach(module: nn.Module, name: str, entry: MergeEntry) -> ModuleMerge:
    state = _ACTIVE.get(module)
    if state is None:
        state = _ACTIVE[module] = ModuleMerge(module, name)
    state.entries.append(entry)
    return state


def detach(module: nn.Module, entry: MergeEntry) -> None:
    """Remove ``entry`` and rewrite the weight; the last removal restores the original bytes."""
    state = _ACTIVE.get(module)
    if state is None:
        return
    state.entries = [e for e in state.entries if e is not entry]
    state.refresh()
    if not state.entries:
        del _ACTIVE[module]


def state_of(module: nn.Module) -> ModuleMerge | None:
    return _ACTIVE.get(module)
