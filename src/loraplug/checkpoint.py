"""Baking adapters into a checkpoint file, streamed tensor by tensor (``loraplug merge``).

Peak memory is about one weight (in float32), not the model. Float weights are merged in float32
and written back in their dtype; fp8 weights (plain, or ComfyUI "scaled fp8" with a
``scale_weight`` beside them) are dequantized, merged and requantized with a new per-tensor scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from . import specs
from .adapters import AdapterSet
from .arch import ModelIndex, Target
from .errors import UnmatchedKeysError, UnsupportedModuleError, sample
from .formats import stream
from .runtime.quant import FP8, fp8_saturated, fp8_scaled
from .skeleton import from_shapes
from .specs.base import Patch


@dataclass
class MergeSummary:
    modules: int = 0
    keys: int = 0
    requantized: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)


def _plan(reader: stream.Reader, sets: list[AdapterSet], strengths: list[float], strict: bool):
    shapes = {k: reader.shape(k) for k in reader.entries}
    index = ModelIndex(from_shapes(shapes))
    per_module: dict[str, list[tuple[Patch, Target, float]]] = {}
    summary = MergeSummary()
    for adapters, strength in zip(sets, strengths, strict=True):
        plan = index.resolve(adapters)
        summary.unmatched.update(plan.unmatched)
        for key, targets in plan.matched.items():
            adapter = adapters.adapters[key]
            spec = specs.get(adapter.algorithm)
            for t in targets:
                op = index.ops[t.module]
                part = adapter if t.rows is None else specs.take_rows(adapter, *t.rows)
                patch = spec.build(part, op, op.out_features if t.size is None else t.size)
                per_module.setdefault(t.module, []).append((patch, t, strength))
            summary.keys += 1
    if strict and summary.unmatched:
        raise UnmatchedKeysError(
            f"{len(summary.unmatched)} adapter keys match no weight of this checkpoint: {sample(summary.unmatched)}. "
            "Nothing was written; check the checkpoint is the adapter's base model (or pass --no-strict)."
        )
    for module, entries in per_module.items():
        if f"{module}.bias" not in reader.entries and any(p.diff_b is not None for p, _, _ in entries):
            raise UnsupportedModuleError(
                f"{module}: the adapter has a bias diff but the checkpoint has no {module}.bias."
            )
    summary.modules = len(per_module)
    return per_module, summary


def _merged(weight: Tensor, entries, bias: bool) -> Tensor:
    """weight (float32, consumed) + Σ s·ΔW per slice (or the bias diffs when ``bias``); in place
    unless an adapter reads the original weight (DoRA, OFT), to keep the peak at ~2 copies."""
    reads = any(p.reads_base for p, _, _ in entries)
    base, out = weight, weight.clone() if reads else weight
    for patch, t, strength in entries:
        part = out if t.size is None else out.narrow(0, t.offset, t.size)
        base_part = base if t.size is None else base.narrow(0, t.offset, t.size)
        if bias:
            delta = patch.bias_delta(strength, base_part)
            if delta is not None:
                part.add_(delta)
        else:
            part.add_(patch.delta_weight(base_part, strength).reshape(part.shape))
    return out


def merge_checkpoint(
    base: str | Path,
    adapters: list[AdapterSet],
    strengths: list[float],
    out: str | Path,
    strict: bool = True,
    progress: bool = True,
) -> MergeSummary:
    """Write ``base`` with ``adapters`` merged into ``out``; tensors stream through one at a time."""
    reader = stream.Reader(base)
    try:
        per_module, summary = _plan(reader, adapters, strengths, strict)
        dtypes = {k: reader.dtype(k) for k in reader.entries}
        pending: dict[str, Tensor] = {}

        def merge_module(module: str) -> None:
            entries = per_module[module]
            key = f"{module}.weight"
            weight = reader.tensor(key)
            scale_key = f"{module}.scale_weight"
            if weight.dtype in FP8 and scale_key in reader.entries:  # scaled fp8: a new scale
                merged = _merged(weight.float() * reader.tensor(scale_key).float(), entries, bias=False)
                pending[key], scale = fp8_scaled(merged, weight.dtype)
                pending[scale_key] = scale.reshape(reader.shape(scale_key)).to(dtypes[scale_key])
                summary.requantized.append(module)
            elif weight.dtype in FP8:  # plain fp8: no scale to change, saturate at the format's range
                pending[key] = fp8_saturated(_merged(weight.float(), entries, bias=False), weight.dtype)
                summary.requantized.append(module)
            elif weight.is_floating_point():
                dtype = weight.dtype
                weight = weight.float() if dtype != torch.float32 else weight
                pending[key] = _merged(weight, entries, bias=False).to(dtype)
            else:
                raise UnsupportedModuleError(
                    f"{key}: {weight.dtype} weights cannot be merged into; use bypass mode at run time."
                )
            if f"{module}.bias" in reader.entries:
                bias = reader.tensor(f"{module}.bias")
                pending[f"{module}.bias"] = _merged(bias.float(), entries, bias=True).to(bias.dtype)

        owners = {}
        for module in per_module:
            for suffix in ("weight", "bias", "scale_weight"):
                owners[f"{module}.{suffix}"] = module

        def produce(key: str) -> Tensor:
            if key in owners and key not in pending:
                merge_module(owners[key])
            return pending.pop(key) if key in pending else reader.tensor(key)

        order = sorted(reader.entries, key=lambda k: reader.entries[k]["data_offsets"][0])
        bar = tqdm(total=len(order), desc="merging", unit="tensor", disable=not progress)
        shapes = {k: reader.shape(k) for k in order}
        metadata = dict(reader.metadata)
        metadata["loraplug_merged"] = ", ".join(a.name for a in adapters)
        stream.write(out, order, dtypes, shapes, metadata, produce, progress=lambda _: bar.update())
        bar.close()
    finally:
        reader.close()
    return summary
