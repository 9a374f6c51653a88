"""Algorithm registry: each algorithm registers the keys it recognises and how to bind itself to a
layer. Formats and runtime ask the registry; they never branch on an algorithm's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..adapters import Adapter
from ..algorithms.op import LayerOp
from .base import Patch

# Tensor names any algorithm may carry next to its own. DoRA: LyCORIS/kohya ``dora_scale`` (axis
# given by its shape), PEFT ``lora_magnitude_vector`` (always per output row, any shape).
COMMON_SUFFIXES = {
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the registry knows of one algorithm.

    ``suffixes`` maps a file key's tail (after the module path) to a canonical tensor name;
    ``identify`` are the canonical names that select this algorithm; ``build`` binds an adapter to
    a layer (LayerOp) and the number of output features it writes, validating shapes.
    """

    name: str
    suffixes: dict[str, str]
    identify: frozenset[str]
    build: Callable[[Adapter, LayerOp, int], Patch]
    rank: Callable[[Adapter], int]


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> AlgorithmSpec:
    return _REGISTRY[name]


def all_suffixes() -> dict[str, str]:
    """Every recognised key tail, longest first (so 'lora_up.weight' beats 'weight')."""
    table = dict(COMMON_SUFFIXES)
    for spec in _REGISTRY.values():
        table.update(spec.suffixes)
    return dict(sorted(table.items(), key=lambda kv: -len(kv[0])))


def identify(names: set[str]) -> AlgorithmSpec | None:
    """The algorithm whose identifying tensors are all present (most specific first)."""
    found = [s for s in _REGISTRY.values() if s.identify <= names]
    return max(found, key=lambda s: len(s.identify), default=None)


def known_algorithms() -> list[str]:
    return sorted(_REGISTRY)


from . import lora  # noqa: E402,F401  (registers itself)
