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
from ..arch import FILE_PREFIXES, ModelIndex, text_encoders
from ..arch.text_encoders import text_encoder_key
from ..errors import FormatError, LoraplugError

WRITE_FORMATS = ("peft", "kohya", "comfy")
_KOHYA_NAMES = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "up_bias": "lora_up.bias",
                "magnitude": "dora_scale", "a1": "a1.weight", "a2": "a2.weight", "b1": "b1.weight",
                "b2": "b2.weight", "bm": "bm.weight", "oft_R": "oft_R.weight"}  # fmt: skip
_PEFT_NAMES = {
    **_KOHYA_NAMES,
    "down": "lora_A.weight",
    "up": "lora_B.weight",
    "up_bias": "lora_B.bias",
    "magnitude": "lora_magnitude_vector",
}
_PREFIX = {"kohya": "lora_unet_", "comfy": "diffusion_model."}


def module_names(adapters: AdapterSet, model: nn.Module | None, dotted: bool) -> dict[str, str]:
    """A dotted module path per logical key: the model's own name where the key lands on one whole
    module, else the key without its format prefix. Turning kohya's flattened keys into dotted
    paths (``dotted``) needs the model, except for text encoders (CLIP and T5 names are fixed)."""
    index = ModelIndex(model) if model is not None else None
    names = {}
    for key in adapters.adapters:
        if index is not None:
            targets, _ = index.lookup(key)
            if targets and len(targets) == 1 and targets[0].size is None and targets[0].rows is None:
                names[key] = targets[0].module
                continue
        te = text_encoder_key(key)
        if te is not None and te.flat and dotted:
            names[key] = text_encoders.dotted(te.rest) or _unresolved(key, "the text encoder")
            continue
        if te is not None:
            names[key] = te.rest
            continue
        stripped = next((key[len(p) :] for p in FILE_PREFIXES if key.startswith(p)), key)
        if dotted and adapters.format == "kohya" and index is None:
            _unresolved(key, "the model")
        names[key] = stripped
    return names


def _unresolved(key: str, owner: str) -> str:
    raise FormatError(
        f"{key}: a flattened (kohya) name cannot be turned back into a module path without {owner}; "
        "pass model= (or --model) so loraplug can resolve it against the real modules, or write "
        "format='kohya'."
    )


def _key_prefix(key: str, name: str, fmt: str, component: str) -> str:
    """The file prefix (module path included) of ``key`` in ``fmt``. Text-encoder keys keep their
    component: PEFT files name it (``text_encoder_2.``), kohya files number it (``lora_te2_``), and
    ComfyUI files keep ComfyUI's own text-encoder names or take kohya's, which ComfyUI resolves
    against the CLIP it loads."""
    te = text_encoder_key(key)
    if te is None:
        if fmt == "peft":
            return f"{component}.{name}."
        return _PREFIX[fmt] + (name.replace(".", "_") if fmt == "kohya" else name) + "."
    name = text_encoders.canonical(name)
    if fmt == "comfy" and te.prefix.startswith("text_encoders."):
        return te.prefix + name + "."
    if te.component not in text_encoders.KOHYA_PREFIX and fmt == "peft":
        raise FormatError(
            f"{key}: ComfyUI's {te.component} is text_encoder_2 in Flux but text_encoder_3 in SD3, and "
            "PEFT files name text encoders by position; write format='comfy' to keep it, or "
            "format='kohya' (lora_te3_, T5's prefix in kohya's Flux and SD3 files, which ComfyUI reads)."
        )
    if fmt == "peft":
        return f"{te.component}.{name}."
    kohya = (
        te.prefix if te.flat else text_encoders.KOHYA_PREFIX.get(te.component, text_encoders.KOHYA_T5)
    )  # lora_te_ stays
    return kohya + name.replace(".", "_") + "."


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
        scale = lora_scale(adapter.alpha, down.shape[0], adapter.rslora)
        delta = lora_delta_weight(down.float(), up.float(), None if mid is None else mid.float(), scale)
        new_down, new_up = lora_resize(delta, rank)
        r = new_down.shape[0]
        tensors = {k: v for k, v in t.items() if k not in ("down", "up", "mid")}
        if "up_bias" in t:  # its scale folds in like the weights' (the new alpha is the new rank)
            tensors["up_bias"] = (t["up_bias"].float() * scale).to(t["up_bias"].dtype)
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
        plain = adapter.algorithm == "lora" and not {
            "mid",
            "dora_scale",
            "magnitude",
            "diff_b",
            "up_bias",
        } & set(adapter.tensors)
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
        prefix = _key_prefix(key, names[key], fmt, component)
        name = prefix[:-1]  # PEFT configs name modules with their component prefix
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
        metadata.setdefault("loraplug_rank", str(_most_common(ranks.values())))
    if fmt == "peft" and ranks:
        metadata["lora_adapter_metadata"] = json.dumps(_peft_config(ranks, alphas, rslora))
    return tensors, metadata


def _most_common(values):
    """The value that occurs most often."""
    values = list(values)
    return max(set(values), key=values.count)


def _of_component(values: dict, component: str) -> dict:
    """The entries of ``values`` (keyed ``component.module``) under ``component``, keyed by module as
    a PEFT target (``text_encoders.peft_target`` for text encoders)."""
    target = text_encoders.peft_target if component in text_encoders.KOHYA_PREFIX else str
    return {target(n.split(".", 1)[1]): v for n, v in values.items() if n.startswith(component + ".")}


def _peft_config(ranks: dict, alphas: dict, rslora: bool) -> dict:
    """PEFT LoraConfigs keyed by component prefix, as diffusers writes them (``ranks`` and ``alphas``
    are keyed by ``component.module``): per component the most common rank and alpha as defaults,
    the rest as exact-name patterns; text encoders' targets as ``text_encoders.peft_target``."""
    out = {}
    for component in sorted({name.split(".", 1)[0] for name in ranks}):
        own, own_alphas = _of_component(ranks, component), _of_component(alphas, component)
        r, alpha = _most_common(own.values()), _most_common(own_alphas.values())
        config = {
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": rslora,
            "target_modules": sorted(own),
            "rank_pattern": {re.escape(k): v for k, v in own.items() if v != r},
            "alpha_pattern": {re.escape(k): v for k, v in own_alphas.items() if v != alpha},
        }
        out.update({f"{component}.{k}": v for k, v in config.items()})
    return out


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
