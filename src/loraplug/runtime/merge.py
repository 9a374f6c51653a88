"""Merge mode: W = W₀ + Σ sᵢ · ΔWᵢ(W₀), always recomputed from the original bytes W₀.

The original weight is kept once per module; removing the last merge copies those bytes back, so
``remove()`` restores the model bit-identically (nothing is ever subtracted back).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import Target
from ..errors import UnsupportedModuleError
from ..specs.base import Patch
from .quant import is_float_weight


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
        self.original = module.weight.detach().clone()
        self.entries: list[MergeEntry] = []

    def refresh(self) -> None:
        """Rewrite the weight from the original bytes and the current entries."""
        weight = self.module_ref().weight
        active = [e for e in self.entries if e.strength != 0]
        with torch.no_grad():
            if not active:
                weight.copy_(self.original)
                return
            base = self.original.float()
            merged = base.clone()
            for e in active:
                t = e.target
                part = merged if t.size is None else merged.narrow(0, t.offset, t.size)
                part_base = base if t.size is None else base.narrow(0, t.offset, t.size)
                delta = e.patch.delta_weight(part_base).to(part.device)
                part.add_(delta.reshape(part.shape), alpha=e.strength)
            weight.copy_(merged.to(weight.dtype))


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, ModuleMerge] = weakref.WeakKeyDictionary()


def check_mergeable(module: nn.Module, name: str) -> None:
    """Raise before anything is touched when the weight cannot be merged into."""
    if not is_float_weight(module):
        w = module.weight
        raise UnsupportedModuleError(
            f"{name}: merge mode needs a float weight, this one is {type(w).__name__}/{w.dtype}. "
            "Use mode='bypass', which runs adapters beside quantized weights."
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
