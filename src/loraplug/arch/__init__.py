"""Map an AdapterSet's logical keys onto a model's real modules and output slices.

Keys are matched against the model's own module names (never by guessing separators): dotted keys
by dotted-path suffix, kohya's flattened keys by the flattened form of the real names, each
required to be unambiguous. Architecture tables add fused aliases: a split name (``to_q``) that
lives in a slice of a fused module (``to_qkv``, ``img_attn.qkv``, ``linear1``), sized from the
model's real shapes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..adapters import AdapterSet
from ..algorithms.op import LayerOp, layer_op
from . import text_encoders

# Keys of other pipeline components (text encoders): matched when the model is that component,
# otherwise reported as belonging to it rather than as unmatched.
COMPONENT_PREFIXES = {prefix: component for prefix, component, _ in text_encoders.PREFIXES}
INNER_PREFIXES = ("text_model.", "text_model_")
FILE_PREFIXES = (
    *COMPONENT_PREFIXES,
    "base_model.model.",
    "transformer.",
    "unet.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
)


@dataclass(frozen=True)
class Target:
    """A module and the part of its output an adapter writes: rows [offset, offset+size) of the
    weight's dim 0 (output features); size None means the whole output. ``rows`` (start, size)
    picks the adapter's own output rows that go there, when one adapter spans several modules
    (a fused-qkv LoRA on split q/k/v) or lands permuted (Flux's final modulation)."""

    module: str
    offset: int = 0
    size: int | None = None
    rows: tuple[int, int] | None = None

    @property
    def slice(self) -> tuple[int, int, int] | None:
        """(dim, offset, size) as ComfyUI writes it, or None for the whole module."""
        return None if self.size is None else (0, self.offset, self.size)

    def __str__(self) -> str:
        where = (
            self.module if self.size is None else f"{self.module}[{self.offset}:{self.offset + self.size}]"
        )
        if self.rows is None:
            return where
        return f"{where} <- rows {self.rows[0]}:{self.rows[0] + self.rows[1]}"


def split(fused: str, parts: list[str], sizes: list[int]) -> dict[str, list[Target]]:
    """Consecutive slices of ``fused``'s output, one per part name."""
    out, offset = {}, 0
    for part, size in zip(parts, sizes, strict=True):
        out[part] = [Target(fused, offset, size)]
        offset += size
    return out


def spread(modules: list[str], sizes: list[int]) -> list[Target]:
    """One adapter over several whole modules: consecutive rows of its output to each."""
    out, start = [], 0
    for module, size in zip(modules, sizes, strict=True):
        out.append(Target(module, rows=(start, size)))
        start += size
    return out


# An alias provider returns ({alias name: targets}, {real names it shadows}).
AliasProvider = Callable[[nn.Module, dict[str, LayerOp]], tuple[dict[str, list[Target]], set[str]]]
PROVIDERS: list[AliasProvider] = []


def provider(fn: AliasProvider) -> AliasProvider:
    PROVIDERS.append(fn)
    return fn


@dataclass
class Plan:
    """Where each logical key of one AdapterSet lands, and why the others do not."""

    matched: dict[str, list[Target]] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)


class ModelIndex:
    """The model's adaptable layers (Linear/ConvNd and subclasses) under every name a key may use."""

    def __init__(self, model: nn.Module):
        self.modules: dict[str, nn.Module] = {}
        self.ops: dict[str, LayerOp] = {}
        for name, module in model.named_modules():
            op = layer_op(module)
            if op is not None and name:
                self.modules[name], self.ops[name] = module, op
        shadowed: set[str] = set()
        aliases: dict[str, list[Target]] = {}
        for fn in PROVIDERS:
            found, hidden = fn(model, self.ops)
            aliases.update(found)
            shadowed |= hidden
        self.entries: dict[str, list[Target]] = {n: [Target(n)] for n in self.ops if n not in shadowed}
        self.entries.update(aliases)
        self.shadowed = shadowed
        self._dotted: dict[str, set[str]] = defaultdict(set)
        self._flat: dict[str, set[str]] = defaultdict(set)
        for name in self.entries:
            parts = name.split(".")
            for i in range(len(parts)):
                self._dotted[".".join(parts[i:])].add(name)
                self._flat["_".join(parts[i:])].add(name)

    def lookup(self, key: str) -> tuple[list[Target] | None, str]:
        """The targets of a logical key, or None and the reason it has none."""
        ambiguous: set[str] = set()
        for variant in _variants(key):
            if variant in self.entries:
                return self.entries[variant], ""
            table = self._dotted if "." in variant else self._flat
            names = table.get(variant, set())
            if len(names) == 1:
                return self.entries[next(iter(names))], ""
            ambiguous |= names
        if ambiguous:
            return None, f"ambiguous: matches {len(ambiguous)} modules ({', '.join(sorted(ambiguous)[:3])} …)"
        return None, "no module of this model has this name"

    def resolve(self, adapters: AdapterSet) -> Plan:
        plan = Plan()
        for key in adapters.adapters:
            targets, reason = self.lookup(key)
            if targets is None:
                plan.unmatched[key] = reason
            else:
                plan.matched[key] = targets
        return plan


def component_of(key: str) -> str | None:
    """The pipeline component a key's prefix names (text encoders), if any."""
    return next((c for p, c in COMPONENT_PREFIXES.items() if key.startswith(p)), None)


def _variants(key: str) -> list[str]:
    """The key, then with each known prefix stripped, then with a second one stripped
    (``lora_te1_`` + ``text_model_`` for text encoders whose modules drop ``text_model``)."""
    out = [key]
    for prefix in FILE_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            out.append(rest)
            out += [rest[len(inner) :] for inner in INNER_PREFIXES if rest.startswith(inner)]
    return out


def resolve(model: nn.Module, adapters: AdapterSet) -> Plan:
    """Plan for one AdapterSet on ``model`` (see ModelIndex)."""
    return ModelIndex(model).resolve(adapters)


from . import diffusers, flux, flux2, sd3, unet, zimage  # noqa: E402,F401  (register their providers)
