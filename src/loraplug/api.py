"""The public verbs: load, apply, merge."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import specs
from .adapters import AdapterSet
from .arch import ModelIndex, Target, component_of
from .arch.flux import widened_input_hint
from .errors import (
    HandleError,
    LoraplugError,
    ShapeMismatchError,
    UnmatchedKeysError,
    UnsupportedModuleError,
    sample,
)
from .formats import load as _load
from .formats import write
from .report import Report
from .runtime import bypass, kernels
from .runtime import merge as merge_rt
from .runtime.masks import Mask, token_stream
from .runtime.quant import is_float_weight
from .specs.base import Patch

AdapterLike = AdapterSet | str | Path | dict
MODES = ("bypass", "merge")


def load(source: AdapterLike, *, name: str | None = None) -> AdapterSet:
    """Read adapters from a file (safetensors, .pt/.bin), a PEFT directory, or a state dict."""
    return _load(source, name=name)


@dataclass(eq=False)
class _Bound:
    """One installed entry: which adapter set it belongs to and on which module."""

    set_index: int
    module: nn.Module
    entry: bypass.Entry | merge_rt.MergeEntry


class Handle:
    """The adapters one ``apply`` installed: change strength, toggle, or remove them."""

    def __init__(self, mode: str, sets: list[AdapterSet], strengths: list[float], report: Report):
        self.mode = mode
        self.adapters = sets
        self.report = report
        self._strengths = list(strengths)
        self._enabled = True
        self._bound: list[_Bound] = []
        self._removed = False
        self.masks = [Mask() for _ in sets]

    @property
    def strength(self) -> list[float]:
        return list(self._strengths)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_strength(self, strength: float | Sequence[float]) -> None:
        """New strength(s), effective on the next forward (bypass) or at once (merge)."""
        self._live()
        self._strengths = _strengths(strength, len(self.adapters))
        self._sync()

    def set_mask(
        self,
        mask: Tensor | Sequence[Tensor | None] | None,
        text_value: float = 1.0,
        tokens: bool | None = None,
        image_tokens: int | None = None,
        text: Tensor | Sequence[Tensor | None] | None = None,
    ) -> None:
        """Weight each adapter set's output per token: a spatial mask (H×W or B×H×W, any size) is
        mapped onto every module's layout (conv maps, image tokens; text tokens get
        ``text_value``), a token mask ((T,) or (B, T); ``tokens=True`` for a 2-D one) is used as
        is; ``text`` weights the text tokens one by one (FreeFuse zeroes the other subjects' words).
        One mask (and text mask) for every set, or a list with one (or None) per set; None clears."""
        self._live()
        if self.mode != "bypass":
            raise HandleError("masks weight tokens of the output: they need mode='bypass'.")
        values = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(self.adapters)
        if len(values) != len(self.adapters):
            raise HandleError(f"{len(values)} masks for {len(self.adapters)} adapter sets; give one per set.")
        texts = list(text) if isinstance(text, (list, tuple)) else [text] * len(self.adapters)
        for holder, value, words in zip(self.masks, values, texts, strict=True):
            holder.set(value, text_value, tokens, words)
            holder.image_tokens = image_tokens

    def enable(self) -> None:
        self._live()
        self._enabled = True
        self._sync()

    def disable(self) -> None:
        """Turn the adapters off without removing them (strength 0, nothing re-hooked)."""
        self._live()
        self._enabled = False
        self._sync()

    def remove(self) -> None:
        """Take the adapters out; the model is bit-identical to before ``apply``."""
        if self._removed:
            return
        for b in reversed(self._bound):
            if self.mode == "bypass":
                bypass.detach(b.module, b.entry)
            else:
                merge_rt.detach(b.module, b.entry)
        self._bound.clear()
        self._removed = True

    def __getstate__(self) -> dict:
        """Pickled with its model: a merge handle also carries each module's original bytes (the
        merge state, which the model does not reach), so ``remove()`` restores the copy."""
        state = dict(self.__dict__)
        if self.mode == "merge":
            state["_merge_states"] = [merge_rt.state_of(b.module) for b in self._bound]
        return state

    def __setstate__(self, state: dict) -> None:
        state.pop("_merge_states", None)  # unpickling them registered them with their modules
        self.__dict__.update(state)

    def _effective(self, index: int) -> float:
        return self._strengths[index] if self._enabled else 0.0

    def _sync(self) -> None:
        touched = {}
        for b in self._bound:
            value = self._effective(b.set_index)
            if self.mode == "bypass":
                b.entry.strength.fill_(value)
                b.entry.level = value
            else:
                b.entry.strength = value
            touched[id(b.module)] = b.module
        for module in touched.values():
            if self.mode == "bypass":
                bypass.runners(module).refresh_strengths()
            else:
                merge_rt.state_of(module).refresh()

    def _live(self) -> None:
        if self._removed:
            raise HandleError("this handle was removed; call lp.apply again to re-apply the adapters.")

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = [a.name for a in self.adapters]
        return f"Handle(mode={self.mode!r}, adapters={names}, strength={self._strengths}, enabled={self._enabled})"


def apply(
    model: nn.Module,
    adapters: AdapterLike | Sequence[AdapterLike],
    strength: float | Sequence[float] = 1.0,
    mode: str = "bypass",
    strict: bool = True,
) -> Handle:
    """Apply one or several adapter sets to ``model``; all-or-nothing.

    Every key is matched to a module (slice) or reported; with strict=True an unmatched key
    raises UnmatchedKeysError before the model is touched. Returns a Handle.
    """
    if mode not in MODES:
        raise LoraplugError(f"mode={mode!r}; use one of {', '.join(MODES)}.")
    kernels.check_settings()
    items = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    sets = [load(a) for a in items]
    strengths = _strengths(strength, len(sets))
    index = ModelIndex(model)
    report = Report()
    bindings = []  # (set index, module name, target, patch), built before the model is touched
    for i, adapter_set in enumerate(sets):
        tag = f"{adapter_set.name}:" if len(sets) > 1 else ""
        plan = index.resolve(adapter_set)
        for key, reason in plan.unmatched.items():
            component = component_of(key)
            if component is not None:
                report.other_components[tag + key] = component
            else:
                report.unmatched[tag + key] = reason
        for key in adapter_set.unknown_keys:
            report.unmatched[tag + key] = "no algorithm recognises this tensor name"
        for key, targets in plan.matched.items():
            adapter = adapter_set.adapters[key]
            spec = specs.get(adapter.algorithm)
            report.matched[tag + key] = targets
            for target in targets:
                op = index.ops[target.module]
                if op.kind not in spec.layers:
                    raise UnsupportedModuleError(
                        f"{key}: a {spec.name} adapter cannot adapt {target.module}, a {op.kind} layer "
                        f"({type(index.modules[target.module]).__name__}). The key points at the wrong "
                        "module: check the adapter is for this model."
                    )
                size = op.out_features if target.size is None else target.size
                part = adapter if target.rows is None else specs.take_rows(adapter, *target.rows)
                try:
                    patch = spec.build(part, op, size)
                except ShapeMismatchError as err:
                    hint = widened_input_hint(target.module, op.in_features, part.tensors)
                    if not hint:
                        raise
                    raise ShapeMismatchError(f"{err}{hint}") from None
                if (
                    patch.reads_base
                    and mode == "bypass"
                    and not is_float_weight(index.modules[target.module])
                ):
                    report.dequantized.add(target.module)
                bindings.append((i, target, patch))
                report.modules.add(target.module)
                report.parameters += patch.parameters
    if strict and report.unmatched:
        raise UnmatchedKeysError(
            f"{len(report.unmatched)} adapter keys match no module of this model: "
            f"{sample(report.unmatched)}. Nothing was applied. Check that the adapter is for this "
            "model (and this layout), or pass strict=False to apply the matched keys and see "
            "handle.report.unmatched."
        )
    if mode == "merge":
        by_module: dict[str, list[Patch]] = {}
        for _, target, patch in bindings:
            by_module.setdefault(target.module, []).append(patch)
        for name, patches in by_module.items():
            merge_rt.check_mergeable(index.modules[name], name, patches)
    if report.other_components:
        names = ", ".join(sorted(set(report.other_components.values())))
        warnings.warn(
            f"{len(report.other_components)} adapter keys are for {names}, not this model; apply the "
            "file to that component as well (see handle.report.other_components).",
            stacklevel=2,
        )
    handle = Handle(mode, sets, strengths, report)
    try:
        _install(handle, index, bindings)
    except BaseException:
        handle.remove()
        raise
    return handle


def save(
    adapters: AdapterLike | Handle,
    path: str | Path,
    format: str = "peft",
    *,
    model: nn.Module | None = None,
    component: str = "transformer",
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write adapters as safetensors in ``format`` ("peft" = diffusers/PEFT keys with alpha in
    ``lora_adapter_metadata``, "kohya" = ``lora_unet_…`` with alpha tensors, "comfy" =
    ``diffusion_model.…``). ``model`` resolves kohya's flattened names; converting is
    ``lp.save(lp.load(src), dst, format=...)``. A Handle or a TrainResult saves its adapters;
    ``metadata`` (e.g. a base-model hint) joins loraplug's own (version, algorithm, rank)."""
    if isinstance(adapters, Handle):
        if len(adapters.adapters) != 1:
            raise HandleError(
                "this handle holds several adapter sets; save them one by one (handle.adapters)."
            )
        adapters = adapters.adapters[0]
    if isinstance(getattr(adapters, "adapters", None), AdapterSet):  # a TrainResult
        adapters = adapters.adapters
    return write.save(
        load(adapters), path, format, model=model, component=component, dtype=dtype, metadata=metadata
    )


def merge(
    model: nn.Module,
    adapters: AdapterLike | Sequence[AdapterLike],
    strength: float | Sequence[float] = 1.0,
    strict: bool = True,
) -> Handle:
    """``apply(..., mode="merge")``: weights rewritten, exactly restorable with ``remove()``."""
    return apply(model, adapters, strength=strength, mode="merge", strict=strict)


def _install(handle: Handle, index: ModelIndex, bindings: list[tuple[int, Target, Patch]]) -> None:
    touched = {}
    for i, target, patch in bindings:
        module = index.modules[target.module]
        value = handle._effective(i)
        if handle.mode == "bypass":
            device = module.weight.device if module.weight.device.type != "meta" else None
            strength = torch.tensor(value, dtype=torch.float32, device=device)
            entry = bypass.Entry(patch, target, strength, handle.masks[i], token_stream(target.module), value)
            bypass.attach(module, target.module, index.ops[target.module], entry)
        else:
            entry = merge_rt.MergeEntry(patch, target, value)
            touched[id(module)] = merge_rt.attach(module, target.module, entry)
        handle._bound.append(_Bound(i, module, entry))
    for state in touched.values():
        state.refresh()


def _strengths(strength: float | Sequence[float], n: int) -> list[float]:
    if isinstance(strength, (int, float)):
        return [float(strength)] * n
    values = [float(s) for s in strength]
    if len(values) != n:
        raise HandleError(f"{len(values)} strengths for {n} adapter sets; give one per adapter set.")
    return values
