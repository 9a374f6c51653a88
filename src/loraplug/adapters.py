"""AdapterSet: the adapters of one file, per logical key, algorithm-tagged, validated."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Adapter:
    """One module's adapter as the file states it.

    ``key`` is the module path in the file's own naming (format prefixes kept), ``tensors`` uses
    canonical names (``down``, ``up``, ``mid``, ``dora_scale``, …), ``source`` maps each canonical
    name back to the file key; ``config`` is the PEFT-style config that applies to it, if any.
    """

    key: str
    algorithm: str
    tensors: dict[str, Tensor]
    alpha: float | None = None
    rslora: bool = False
    source: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def config_rank(self) -> int | None:
        """The rank a PEFT config states for this module (rank_pattern, else r), or None."""
        if not self.config:
            return None
        return pattern_value(self.config.get("rank_pattern"), self.key, self.config.get("r"))

    @property
    def file_keys(self) -> list[str]:
        return list(self.source.values())

    @property
    def parameters(self) -> int:
        return sum(t.numel() for name, t in self.tensors.items() if name != "alpha")


@dataclass
class AdapterSet:
    """All adapters of one file or state dict.

    ``unknown_keys`` are tensors no algorithm recognised; ``apply(strict=True)`` refuses them.
    """

    adapters: dict[str, Adapter]
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    name: str = "adapter"

    @property
    def algorithms(self) -> dict[str, int]:
        """How many modules each algorithm adapts, e.g. {"lora": 304}."""
        return dict(Counter(a.algorithm for a in self.adapters.values()))

    @property
    def parameters(self) -> int:
        return sum(a.parameters for a in self.adapters.values())

    def __len__(self) -> int:
        return len(self.adapters)

    def __repr__(self) -> str:
        return (
            f"AdapterSet(name={self.name!r}, format={self.format!r}, "
            f"algorithms={self.algorithms}, parameters={self.parameters})"
        )


def pattern_value(patterns: dict | None, module_key: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the first pattern matching the key's tail wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def matches_modules(patterns, module_key: str) -> bool:
    """PEFT's target rule: a regex string must match the whole key, a list matches key tails."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_key) is not None
    return any(module_key == p or module_key.endswith("." + p) for p in patterns or ())
