"""Detect a file's key convention and turn its tensors into an AdapterSet."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from .. import specs
from ..adapters import Adapter, AdapterSet, pattern_value
from ..errors import AdapterTensorError, FormatError, sample
from .io import read_path
from .variants import rewrite

FORMATS = ("peft", "kohya", "comfy", "diffusers", "diffusers_old", "xlabs")
_PEFT_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.(weight|bias)$")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lycoris_", "lora_transformer_")
_COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
_CONFIG_FIELDS = {
    "r",
    "lora_alpha",
    "alpha",
    "use_rslora",
    "alpha_pattern",
    "rank_pattern",
    "use_dora",
    "peft_type",
    "feedforward_modules",
    "oft_block_size",
    "coft",
    "eps",
    "block_share",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
}


def load(source, *, name: str | None = None) -> AdapterSet:
    """An AdapterSet from a path (safetensors, .pt/.bin, PEFT dir), a state dict, or an AdapterSet."""
    if isinstance(source, AdapterSet):
        return source
    if isinstance(source, dict):
        return parse(source, name=name or "state_dict")
    if isinstance(source, (str, Path)):
        tensors, metadata, config = read_path(source)
        return parse(tensors, metadata, config, name=name or Path(source).stem)
    raise TypeError(f"cannot load adapters from {type(source).__name__}; pass a path or a state dict")


def parse(
    tensors: dict[str, Tensor],
    metadata: dict[str, str] | None = None,
    config: dict | None = None,
    name: str = "adapter",
) -> AdapterSet:
    """Group tensors by module, identify each module's algorithm, validate, resolve scales."""
    metadata = dict(metadata or {})
    configs = _configs(metadata, config)
    groups, unknown = _group(tensors)
    adapters = {}
    for module_key, found in groups.items():
        if specs.identify({c: t for c, (_, t) in found.items()}) is None and specs.is_weak(set(found)):
            unknown.extend(k for k, _ in found.values())
            continue
        adapters[module_key] = _adapter(module_key, found, configs)
    if not adapters:
        raise FormatError(
            f"{name}: no adapter keys recognised among {len(tensors)} tensors ({sample(tensors)}). "
            f"Formats tried: {', '.join(FORMATS)}; algorithms known: {', '.join(specs.known_algorithms())}."
        )
    return AdapterSet(adapters, _detect(tensors), metadata, sorted(unknown), name)


def _group(tensors: dict[str, Tensor]) -> tuple[dict[str, dict[str, tuple[str, Tensor]]], list[str]]:
    """module key -> canonical name -> (file key, tensor); and the keys nothing recognised."""
    suffixes = specs.all_suffixes()
    groups: dict[str, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    unknown = []
    for key, tensor in tensors.items():
        norm = _PEFT_ADAPTER_NAME.sub(r".\1.\3", rewrite(key)[0])
        for suffix, canonical in suffixes.items():
            if norm.endswith("." + suffix):
                module_key = norm[: -len(suffix) - 1]
                if canonical in groups[module_key]:
                    other = groups[module_key][canonical][0]
                    raise FormatError(
                        f"{key} and {other} both give {module_key}.{canonical}; the state dict holds "
                        "two adapters for one module (several PEFT adapter names?). Pass one."
                    )
                groups[module_key][canonical] = (key, tensor)
                break
        else:
            unknown.append(key)
    return groups, unknown


def _adapter(module_key: str, found: dict[str, tuple[str, Tensor]], configs: dict) -> Adapter:
    spec = specs.identify({c: t for c, (_, t) in found.items()})
    keys = [k for k, _ in found.values()]
    if spec is None:
        raise AdapterTensorError(
            f"{module_key}: tensors {sample(keys)} do not form a complete adapter (e.g. lora_up "
            "without lora_down). The file is incomplete or damaged; re-export it."
        )
    tensors = {}
    for canonical, (key, tensor) in found.items():
        if canonical not in specs.SCALARS:
            _validate(key, tensor)
        elif tensor.numel() != 1:
            raise AdapterTensorError(f"{key}: a scalar was expected, found shape {tuple(tensor.shape)}.")
        tensors[canonical] = tensor
    adapter = Adapter(module_key, spec.name, tensors, source={c: k for c, (k, _) in found.items()})
    alpha_tensor = tensors.pop("alpha", None)
    config = _config_for(module_key, configs) or {}
    adapter.config = config
    if alpha_tensor is not None:
        adapter.alpha = float(alpha_tensor.float().reshape(-1)[0])
    elif config:
        default = config.get("lora_alpha", config.get("alpha"))
        adapter.alpha = pattern_value(config.get("alpha_pattern"), module_key, default)
        adapter.rslora = bool(config.get("use_rslora", False))
    if adapter.alpha is not None and not math.isfinite(adapter.alpha):
        raise AdapterTensorError(f"{module_key}: alpha is {adapter.alpha}; the file is damaged.")
    return adapter


def _validate(key: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise AdapterTensorError(f"{key}: is {type(tensor).__name__}, not a tensor.")
    if not tensor.is_floating_point():
        raise AdapterTensorError(
            f"{key}: dtype {tensor.dtype}; adapter tensors must be float (fp32/fp16/bf16). "
            "Re-export the adapter unquantized."
        )
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise AdapterTensorError(
            f"{key}: dtype {tensor.dtype} is not a compute dtype for adapters; convert it to bf16 or fp32."
        )
    if not torch.isfinite(tensor).all():
        raise AdapterTensorError(
            f"{key}: contains NaN or Inf values; the adapter is damaged (or overflowed in training)."
        )


def _configs(metadata: dict[str, str], config: dict | None) -> dict[str, dict]:
    """PEFT-style configs by component prefix ('' = applies to all keys)."""
    out: dict[str, dict] = {}
    if config:
        out[""] = config
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise FormatError(f"safetensors metadata 'lora_adapter_metadata' is not JSON ({err}).") from err
        for key, value in packed.items():
            prefix, _, field = key.rpartition(".")
            if field in _CONFIG_FIELDS or key in _CONFIG_FIELDS:
                out.setdefault(prefix if field in _CONFIG_FIELDS else "", {})[field or key] = value
    return out


def _config_for(module_key: str, configs: dict[str, dict]) -> dict | None:
    for prefix, config in configs.items():
        if prefix and module_key.startswith(prefix + "."):
            return config
    return configs.get("")


def _detect(tensors: dict[str, Tensor]) -> str:
    """The key convention's name, for reports (loading does not depend on it)."""
    keys = list(tensors)
    variant = next((v for v in (rewrite(k)[1] for k in keys) if v), None)
    if variant:
        return variant
    if any(k.startswith(_COMFY_PREFIXES) for k in keys):
        return "comfy"
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or "lora_magnitude_vector" in k for k in keys):
        return "peft"
    if any(".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    return "lycoris"
