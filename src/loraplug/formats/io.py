"""Reading adapter files safely: safetensors (header validated first), PEFT dirs, and pickled
checkpoints only through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import AdapterFileError

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors")
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; any corruption -> AdapterFileError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(
            f"{path}: not a readable safetensors file ({err}). The file may be truncated or still "
            "downloading; download it again."
        ) from err
    return tensors, metadata


def read_pickle(path: Path) -> dict[str, Tensor]:
    """A pickled state dict, loaded with weights_only=True (never arbitrary objects)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles
        raise AdapterFileError(
            f"{path}: could not be loaded as a plain tensor checkpoint ({type(err).__name__}: "
            f"{str(err)[:200]}). loraplug never unpickles arbitrary objects; convert the file to "
            "safetensors with a tool you trust."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise AdapterFileError(f"{path}: holds {type(obj).__name__}, not a dict of tensors.")
    return obj


def read_path(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], dict | None]:
    """(tensors, metadata, peft_config) from a file or a PEFT adapter directory."""
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"{path}: no such file or directory.")
    config = None
    if path.is_dir():
        config_path = path / "adapter_config.json"
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as err:
                raise AdapterFileError(f"{config_path}: invalid JSON ({err}).") from err
        for name in PEFT_WEIGHTS:
            if (path / name).exists():
                path = path / name
                break
        else:
            raise AdapterFileError(
                f"{path}: a directory without adapter weights; expected one of {', '.join(PEFT_WEIGHTS)}."
            )
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path), {}, config
    tensors, metadata = read_safetensors(path)
    return tensors, metadata, config
