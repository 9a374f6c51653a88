"""Algorithm registry: each algorithm registers the keys it recognises and how to bind itself to a
layer. Formats and runtime ask the registry; they never branch on an algorithm's name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..adapters import Adapter
from ..algorithms.op import LayerOp
from ..errors import UnsupportedModuleError
from .base import Patch

# Tensor names any algorithm may carry next to its own. DoRA: LyCORIS/kohya ``dora_scale`` (axis
# given by its shape), PEFT ``lora_magnitude_vector`` (always per output row, any shape).
COMMON_SUFFIXES = {
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
    "diff_b": "diff_b",
    "b_norm": "diff_b",
}


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the registry knows of one algorithm.

    ``suffixes`` maps a file key's tail (after the module path) to a canonical tensor name;
    ``identify`` lists alternative sets of canonical names, any of which selects this algorithm
    (the largest set present wins across algorithms); ``accepts`` can refuse on tensor shapes
    (OFT and BOFT share key names); ``build`` binds an adapter to a layer (LayerOp) and the number
    of output features it writes, validating shapes; ``rank`` reports the adapter's rank;
    ``layers`` are the LayerOp kinds it can adapt; ``row_dims`` says along which dim each of its
    tensors carries output rows (the others are shared by every row), or None where an adapter
    cannot be cut into row ranges.
    """

    name: str
    suffixes: dict[str, str]
    identify: tuple[frozenset[str], ...]
    build: Callable[[Adapter, LayerOp, int], Patch]
    rank: Callable[[Adapter], int | None] = lambda adapter: None
    accepts: Callable[[dict], bool] = lambda tensors: True
    layers: frozenset[str] = frozenset({"linear", "conv"})
    fallback: bool = False  # chosen only when no other algorithm matches (bias-only diffs)
    row_dims: Callable[[Adapter], dict[str, int] | None] = lambda adapter: None


_REGISTRY: dict[str, AlgorithmSpec] = {}
WEAK = {"alpha", "weight", "on_input"}
SCALARS = {"alpha", "on_input"}  # one-element settings, any dtype


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


def identify(tensors: dict) -> AlgorithmSpec | None:
    """The algorithm whose identifying tensors are present (the most specific match)."""
    names = set(tensors)
    best, best_size = None, 0
    for spec in _REGISTRY.values():
        sizes = [len(group) for group in spec.identify if group <= names]
        size = max(sizes, default=0) - (1000 if spec.fallback else 0)
        if sizes and (best is None or size > best_size) and spec.accepts(tensors):
            best, best_size = spec, size
    return best


def is_weak(names: set[str]) -> bool:
    """True when these names alone say nothing about an adapter (an ``alpha``, a bare ``weight``):
    such keys are reported as unknown rather than as a broken adapter."""
    return names <= WEAK


def take_rows(adapter: Adapter, start: int, size: int) -> Adapter:
    """The part of ``adapter`` that writes its output rows [start, start+size): how one adapter is
    spread over several modules. Raises UnsupportedModuleError where the algorithm cannot be cut."""
    dims = get(adapter.algorithm).row_dims(adapter)
    if dims is None:
        raise UnsupportedModuleError(
            f"{adapter.key}: a {adapter.algorithm} adapter spans several modules of this model and cannot "
            "be cut into per-module rows. Apply it to a model with the layout it was trained on."
        )
    dims = {"diff_b": 0, "magnitude": 0, **dims}
    if "dora_scale" in adapter.tensors and adapter.tensors["dora_scale"].shape[0] != 1:
        dims["dora_scale"] = 0
    tensors = {k: t.narrow(dims[k], start, size) if k in dims else t for k, t in adapter.tensors.items()}
    return dataclasses.replace(adapter, tensors=tensors)


def known_algorithms() -> list[str]:
    return sorted(_REGISTRY)


from . import boft, full, glora, ia3, loha, lokr, lora, norm, oft  # noqa: E402,F401  (they register themselves)
