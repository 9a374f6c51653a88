"""Weightless stand-ins of real models for key resolution (``--model`` in the CLI): a checkpoint's
key list and shapes, or a diffusers model directory, as modules on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import AdapterFileError


def from_shapes(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """Linear/Conv modules on the meta device named after every ``<module>.weight`` of 2-5 dims."""
    root = nn.Module()
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        path = key[: -len(".weight")]
        with torch.device("meta"):
            if len(shape) == 2:
                module = nn.Linear(shape[1], shape[0], bias=False)
            elif len(shape) in (3, 4, 5):
                conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(shape)]
                module = conv(shape[1], shape[0], tuple(shape[2:]), bias=False)
            else:
                continue
        _set(root, path, module)
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    node = root
    *parents, leaf = path.split(".")
    for name in parents:
        child = node._modules.get(name)
        if child is None:
            child = nn.Module()
            node.add_module(name, child)
        node = child
    if leaf not in node._modules:
        node.add_module(leaf, module)


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{path}: not a readable safetensors checkpoint ({err}).") from err


def load_skeleton(path: str | Path) -> nn.Module:
    """A meta-device model from a safetensors checkpoint, a list of checkpoints' keys (a text file,
    one ``name shape…`` per line), or a diffusers model directory (config.json)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text())
        import diffusers

        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            raise AdapterFileError(f"{path}: config.json names no diffusers model class.")
        with torch.device("meta"):
            return cls.from_config(config)
    if path.suffix == ".safetensors":
        return from_shapes(checkpoint_shapes(path))
    if path.suffix == ".txt":
        shapes = {}
        for line in path.read_text().splitlines():
            name, *dims = line.split()
            shapes[name] = tuple(int(d) for d in dims)
        return from_shapes(shapes)
    raise AdapterFileError(
        f"{path}: --model takes a safetensors checkpoint, a key list (.txt: name and shape per line) "
        "or a diffusers model directory."
    )
