"""diffusers attention after ``fuse_qkv_projections()``: to_q/to_k/to_v live in ``to_qkv``.

diffusers keeps the split modules after fusing but no longer calls them, so a LoRA bound to
``to_q`` there would silently do nothing: those names are redirected to slices of the fused module
and the split modules are hidden from matching. ``share_fused_weights`` makes the split modules'
weights views into the fused ones, so the model holds one copy instead of two.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algorithms.op import LayerOp
from . import Target, provider, split

FUSIONS = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
    ("to_kv", ("to_k", "to_v")),
)


def fused_slices(fused: str, parts: tuple[str, ...], ops: dict[str, LayerOp]) -> dict[str, list[Target]]:
    """Each part's slice of ``fused``, sized from the parts' own shapes (or equal thirds)."""
    total = ops[fused].out_features
    sizes = [ops[p].out_features if p in ops else total // len(parts) for p in parts]
    if sum(sizes) != total:
        return {}
    return split(fused, list(parts), sizes)


@provider
def fused_attention(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    aliases: dict[str, list[Target]] = {}
    for name, module in model.named_modules():
        if not getattr(module, "fused_projections", False):
            continue
        prefix = f"{name}." if name else ""
        for fused, parts in FUSIONS:
            if prefix + fused not in ops:
                continue
            names = tuple(prefix + p for p in parts)
            for part, target in fused_slices(prefix + fused, names, ops).items():
                aliases[part] = target
    return aliases, set(aliases)


@provider
def peft_wrapped(model: nn.Module, ops: dict[str, LayerOp]) -> tuple[dict[str, list[Target]], set[str]]:
    """Layers already wrapped by PEFT (``x.base_layer``) keep answering to their own name ``x``."""
    return {
        name[: -len(".base_layer")]: [Target(name)] for name in ops if name.endswith(".base_layer")
    }, set()


def share_fused_weights(model: nn.Module) -> int:
    """After diffusers' ``fuse_qkv_projections()``, make each split projection's weight and bias
    views into its fused module's: diffusers keeps both copies (4.3 GB at Flux-dev size in bf16).
    Values are unchanged, and ``unfuse_qkv_projections()`` still works (the split modules then hold
    the fused storage; training the fused layer's weight updates the views with it). A fusion is
    left as it is where a split layer is not a plain float ``nn.Linear`` of the fused one's dtype
    and device (quantized weights are tensor subclasses) or no longer equals its rows of the fused
    layer. Returns the bytes no longer held twice (0 on a second call). safetensors' ``save_file``
    refuses tensors that share storage: save ``{k: v.clone() for k, v in state_dict.items()}``."""
    plan: list[tuple[nn.Parameter, Tensor]] = []
    for module in model.modules():
        if getattr(module, "fused_projections", False):
            for fused, parts in FUSIONS:
                layers = [getattr(module, name, None) for name in (fused, *parts)]
                if all(isinstance(layer, nn.Linear) for layer in layers):
                    plan += _views_into(layers[0], layers[1:])
    for param, view in plan:
        param.data = view
    return sum(view.numel() * view.element_size() for _, view in plan)


def _plain(t: Tensor | None) -> bool:
    return t is None or (type(t) in (nn.Parameter, Tensor) and t.is_floating_point())


def _views_into(fused: nn.Linear, parts: list[nn.Linear]) -> list[tuple[nn.Parameter, Tensor]]:
    """(split parameter, view of the fused parameter's rows) for every weight and bias of
    ``parts`` not already sharing the fused storage; [] where the fusion does not qualify."""
    tensors = [(fused.weight, [p.weight for p in parts])]
    biases = [p.bias for p in parts]
    if any((b is None) != (fused.bias is None) for b in biases):
        return []
    if fused.bias is not None:
        tensors.append((fused.bias, biases))
    plan = []
    for whole, pieces in tensors:
        if whole.device.type == "meta" or not all(_plain(t) for t in (whole, *pieces)):
            return []
        if any(
            t.dtype != whole.dtype or t.device != whole.device or t.shape[1:] != whole.shape[1:]
            for t in pieces
        ):
            return []
        if sum(t.shape[0] for t in pieces) != whole.shape[0]:
            return []
        start = 0
        for piece in pieces:
            rows = whole.detach().narrow(0, start, piece.shape[0])
            start += piece.shape[0]
            if not torch.equal(rows, piece.detach()):
                return []
            if piece.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr():
                plan.append((piece, rows))
    return plan
