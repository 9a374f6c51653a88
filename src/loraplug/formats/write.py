"""Writing AdapterSets in the common key conventions (the inverse of the reader)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import specs
from ..adapters import Adapter, AdapterSet
from ..algorithms.lora import lora_delta_weight, lora_resize, lora_scale
from ..arch import FILE_PREFIXES, ModelIndex
from ..errors import FormatError, LoraplugError

WRITE_FORMATS = ("peft", "kohya", "comfy")
_KOHYA_NAMES = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight",
                "magnitude": "dora_scale", "a1": "a1.weight", "a2": "a2.weight", "b1": "b1.weight",
                "b2": "b2.weight", "bm": "bm.weight", "oft_R": "oft_R.weight"}  # fmt: skip
_PEFT_NAMES = {
    **_KOHYA_NAMES,
    "down": "lora_A.weight",
    "up": "lora_B.weight",
    "magnitude": "lora_magnitude_vector",
}
_PREFIX = {"kohya": "lora_unet_", "comfy": "diffusion_model."}


def module_names(adapters: AdapterSet, model: nn.Module | None, dotted: bool) -> dict[str, str]:
    """A dotted module path per logical key: the model's own name where the key lands on one whole
    module, else the key without its format prefix. Turning kohya's flattened keys into dotted
    paths (``dotted``) needs the model."""
    index = ModelIndex(model) if model is not None else None
    names = {}
    for key in adapters.adapters:
        if index is not None:
            targets, _ = index.lookup(key)
            if targets and len(targets) == 1 and targets[0].size is None and targets[0].rows is None:
                names[key] = targets[0].module
                continue
        stripped = next((key[len(p) :] for p in FILE_PREFIXES if key.startswith(p)), key)
        if dotted and adapters.format == "kohya" and index is None:
            raise FormatError(
                f"{key}: a flattened (kohya) name cannot be turned back into a module path without the "
                "model; pass model= (or --model) so loraplug can resolve it against the real modules."
            )
        names[key] = stripped
    return names


def resize(adapters: AdapterSet, rank: int) -> tuple[AdapterSet, list[str]]:
    """LoRAs re-factored to ``rank`` by SVD of their ΔW (alpha = rank, so the scale folds in);
    returns the new set and the keys left as they were (other algorithms, DoRA)."""
    out, kept = {}, []
    for key, adapter in adapters.adapters.items():
        t = adapter.tensors
        if adapter.algorithm != "lora" or {"dora_scale", "magnitude"} & set(t):
            out[key], kept = adapter, [*kept, key]
            continue
        down, up, mid = t["down"], t["up"], t.get("mid")
        kernel = (mid if mid is not None else down).shape[2:]
        delta = lora_delta_weight(down.float(), up.float(), None if mid is None else mid.float(),
                                  lora_scale(adapter.alpha, down.shape[0], adapter.rslora))  # fmt: skip
        new_down, new_up = lora_resize(delta, rank)
        r = new_down.shape[0]
        tensors = {k: v for k, v in t.items() if k not in ("down", "up", "mid")}
        tensors["down"] = new_down.reshape(r, down.shape[1], *kernel).to(down.dtype)
        tensors["up"] = new_up.reshape(up.shape[0], r, *([1] * len(kernel))).to(up.dtype)
        out[key] = dataclasses.replace(adapter, tensors=tensors, alpha=float(r), rslora=False, config={})
    return dataclasses.replace(adapters, adapters=out), kept


def _file_tensors(adapter: Adapter, fmt: str) -> dict[str, Tensor]:
    """Canonical tensors renamed for ``fmt``; DoRA magnitudes reshaped between conventions."""
    table = _PEFT_NAMES if fmt == "peft" else _KOHYA_NAMES
    out = {}
    for name, tensor in adapter.tensors.items():
        if name == "dora_scale" and fmt == "peft":
            if tensor.shape[0] == 1 and tensor.dim() > 1 and tensor.numel() > 1:
                raise FormatError(
                    f"{adapter.key}: a per-input-column DoRA (wd_on_out=False) has no PEFT form."
                )
            tensor, name = tensor.reshape(-1), "magnitude"
        elif name == "magnitude" and fmt != "peft":
            up = adapter.tensors.get("up")
            tensor = tensor.reshape(-1, *([1] * (up.dim() - 1 if up is not None else 1)))
        out[table.get(name, name)] = tensor
    return out


def _kohya_alpha(adapter: Adapter, rank: int | None) -> float | None:
    """The alpha tensor that gives the same scale without an rsLoRA flag: alpha/r == scale."""
    if rank is None:
        return adapter.alpha
    alpha = float(rank) if adapter.alpha is None else adapter.alpha
    return alpha * math.sqrt(rank) if adapter.rslora else alpha


def fuse_slices(adapters: AdapterSet, model: nn.Module) -> AdapterSet:
    """Plain LoRAs that land in slices of one fused module (q/k/v of img_attn.qkv, linear1) become
    one exact LoRA of that module: downs stacked, ups block-placed with their scales folded in
    (alpha = rank), so tools that only know the fused names (ComfyUI, kohya) load them."""
    index = ModelIndex(model)
    groups: dict[str, list[tuple[Adapter, int, int]]] = {}
    out = {}
    for key, adapter in adapters.adapters.items():
        targets, _ = index.lookup(key)
        plain = adapter.algorithm == "lora" and not {"mid", "dora_scale", "magnitude", "diff_b"} & set(
            adapter.tensors
        )
        if (
            plain
            and targets
            and len(targets) == 1
            and targets[0].size is not None
            and targets[0].rows is None
        ):
            groups.setdefault(targets[0].module, []).append((adapter, targets[0].offset, targets[0].size))
        else:
            out[key] = adapter
    for module, parts in groups.items():
        downs = [
            a.tensors["down"].detach().float().reshape(a.tensors["down"].shape[0], -1) for a, _, _ in parts
        ]
        up = torch.zeros(index.ops[module].out_features, sum(d.shape[0] for d in downs))
        start = 0
        for (a, offset, size), down in zip(parts, downs, strict=True):
            r = down.shape[0]
            up[offset : offset + size, start : start + r] = a.tensors["up"].detach().float().reshape(
                size, r
            ) * lora_scale(a.alpha, r, a.rslora)
            start += r
        out[module] = Adapter(module, "lora", {"down": torch.cat(downs), "up": up}, alpha=float(start))
    return dataclasses.replace(adapters, adapters=out)


def to_state_dict(
    adapters: AdapterSet,
    fmt: str,
    model: nn.Module | None = None,
    component: str = "transformer",
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of ``adapters`` in convention ``fmt``."""
    if fmt not in WRITE_FORMATS:
        raise LoraplugError(f"format={fmt!r}; loraplug writes {', '.join(WRITE_FORMATS)}.")
    if model is not None and fmt in ("kohya", "comfy"):
        adapters = fuse_slices(adapters, model)
    names = module_names(adapters, model, dotted=fmt != "kohya")
    tensors: dict[str, Tensor] = {}
    alphas, ranks, rslora = {}, {}, False
    for key, adapter in adapters.adapters.items():
        name = names[key]
        prefix = f"{component}.{name}." if fmt == "peft" else _PREFIX[fmt] + (
            name.replace(".", "_") if fmt == "kohya" else name) + "."  # fmt: skip
        for suffix, tensor in _file_tensors(adapter, fmt).items():
            tensor = tensor.detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[prefix + suffix] = tensor.contiguous()
        rank = specs.get(adapter.algorithm).rank(adapter) or adapter.config_rank
        if fmt == "peft":
            if rank is not None:
                ranks[name] = rank
            alphas[name] = adapter.alpha if adapter.alpha is not None else rank
            rslora = rslora or adapter.rslora
        else:
            alpha = _kohya_alpha(adapter, rank)
            if alpha is not None:
                tensors[prefix + "alpha"] = torch.tensor(float(alpha))
    from .. import __version__

    extra = metadata or {}
    metadata = {"format": "pt", "loraplug_format": fmt, "loraplug_version": __version__}
    metadata.update(
        {k: v for k, v in adapters.metadata.items() if k not in ("lora_adapter_metadata", "format")}
    )
    metadata.update({k: str(v) for k, v in extra.items()})
    metadata.setdefault("loraplug_algo", ",".join(sorted(adapters.algorithms)))
    if ranks:
        metadata.setdefault("loraplug_rank", str(max(set(ranks.values()), key=list(ranks.values()).count)))
    if fmt == "peft" and ranks:
        metadata["lora_adapter_metadata"] = json.dumps(_peft_config(ranks, alphas, rslora, component))
    return tensors, metadata


def _peft_config(ranks: dict, alphas: dict, rslora: bool, component: str) -> dict:
    """A PEFT LoraConfig (prefixed by component, as diffusers writes it): the most common rank and
    alpha as defaults, the rest as exact-name patterns."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != alpha},
    }
    return {f"{component}.{k}": v for k, v in config.items()}


def save(
    adapters: AdapterSet,
    path: str | Path,
    fmt: str = "peft",
    model: nn.Module | None = None,
    component: str = "transformer",
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapters`` to a safetensors file in convention ``fmt``."""
    tensors, metadata = to_state_dict(adapters, fmt, model, component, dtype, metadata)
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path
