"""Tiny models for examples, the demo and tests (no downloads)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .arch import flux as flux_tables


def tiny_flux(seed: int = 0, layers: int = 2, single_layers: int = 2, heads: int = 2, head_dim: int = 8):
    """A small diffusers FluxTransformer2DModel with random weights (needs diffusers)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        guidance_embeds=False,
        axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
    )
    with torch.no_grad():  # diffusers zero-inits some layers; make every layer matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def flux_inputs(batch: int = 1, image_tokens: int = 16, text_tokens: int = 6, seed: int = 0) -> dict:
    """Keyword inputs for ``tiny_flux`` (a 4x4 latent of packed tokens and a short prompt)."""
    g = torch.Generator().manual_seed(seed)
    side = int(image_tokens**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, image_tokens, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 16, generator=g),
        "pooled_projections": torch.randn(batch, 12, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }


# The Flux tables of loraplug.arch.flux (ComfyUI's own key map checks them in the tests).
DOUBLE_FUSED = flux_tables.DOUBLE
SINGLE_FUSED = {k: v for k, v in flux_tables.SINGLE.items() if k != "attn_qkv"}
GLOBAL_FUSED = flux_tables.GLOBAL
FINAL_MOD = "final_layer.adaLN_modulation.1"  # diffusers' norm_out.linear with its halves swapped


def _fuse(parts: list[nn.Linear], swap_halves: bool = False) -> nn.Linear:
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    if swap_halves:
        weight, bias = (
            weight.roll(weight.shape[0] // 2, 0),
            None if bias is None else bias.roll(bias.shape[0] // 2),
        )
    device, dtype = weight.device, weight.dtype
    fused = nn.Linear(
        parts[0].in_features, weight.shape[0], bias=bias is not None, device=device, dtype=dtype
    )
    if device.type != "meta":
        with torch.no_grad():
            fused.weight.copy_(weight)
            if bias is not None:
                fused.bias.copy_(bias)
    return fused


def bfl_layers(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[str, ...]]]:
    """The linear layers of a diffusers Flux transformer re-laid in BFL/ComfyUI naming, fused.

    Returns the container (``double_blocks.N.img_attn.qkv`` …) and, per BFL name, the diffusers
    modules whose outputs it concatenates (the final modulation: halves swapped). Only the
    projections, not a runnable model. Works on the meta device.
    """
    root = nn.Module()
    sources: dict[str, tuple[str, ...]] = {}
    modules = dict(model.named_modules())
    for bfl, name in (*GLOBAL_FUSED.items(), (FINAL_MOD, "norm_out.linear")):
        if name in modules:
            _set(root, bfl, _fuse([modules[name]], swap_halves=bfl == FINAL_MOD))
            sources[bfl] = (name,)
    for kind, blocks, table in (
        ("double_blocks", "transformer_blocks", DOUBLE_FUSED),
        ("single_blocks", "single_transformer_blocks", SINGLE_FUSED),
    ):
        for n in range(len(getattr(model, blocks))):
            for bfl, parts in table.items():
                names = tuple(f"{blocks}.{n}.{p}" for p in parts)
                path = f"{kind}.{n}.{bfl}"
                _set(root, path, _fuse([modules[x] for x in names]))
                sources[path] = names
    return root, sources


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for p in parents:
        if not hasattr(node, p):
            node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, module)


class ScaledFP8Linear(nn.Linear):
    """A Linear holding its weight in fp8 with a per-tensor ``scale_weight``, computing in the input's
    dtype: the ComfyUI "scaled fp8" layout."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.float8_e4m3fn) -> ScaledFP8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach().float()
        scale = w.abs().max() / torch.finfo(dtype).max
        layer.weight = nn.Parameter((w / scale).to(dtype), requires_grad=False)
        layer.register_buffer("scale_weight", scale.reshape(1))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale_weight.to(x.dtype)
        return torch.nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def import_comfyui(source: Path, workdir: Path) -> Path:
    """A ComfyUI tree (the node pack's tests) copied to ``workdir`` (ComfyUI writes next to
    itself), put first on ``sys.path`` and its argument parsing set up for ``--cpu``; returns the
    copy's root. ``sys.argv`` is left as ComfyUI reads it."""
    root = workdir / "ComfyUI"
    shutil.copytree(source, root)
    sys.path.insert(0, str(root))
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    return root
