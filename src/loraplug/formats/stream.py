"""safetensors read and written one tensor at a time (memory ~ one tensor, not the file).

Tensors are read straight into their own storage (no mmap, whose touched pages would count
against the process) and written from it without copies.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..errors import AdapterFileError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}


class Reader:
    """The header of a safetensors file, and its tensors read on demand with plain reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file = self.path.open("rb")
            (size,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterFileError(f"{self.path}: not a safetensors file ({err}).") from err
        self.start = 8 + size
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.start + end > self.path.stat().st_size:
            raise AdapterFileError(f"{self.path}: truncated ({self.path.stat().st_size} bytes, header needs "
                                   f"{self.start + end}). Download it again.")  # fmt: skip
        for key, info in header.items():
            if info["dtype"] not in DTYPES:
                raise AdapterFileError(
                    f"{self.path}: tensor {key} has dtype {info['dtype']}, which loraplug cannot read."
                )

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def tensor(self, key: str) -> Tensor:
        info = self.entries[key]
        begin, end = info["data_offsets"]
        self.file.seek(self.start + begin)
        flat = torch.empty(end - begin, dtype=torch.uint8)
        if self.file.readinto(flat.numpy()) != end - begin:
            raise AdapterFileError(f"{self.path}: truncated inside tensor {key}. Download it again.")
        return flat.view(DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self) -> None:
        self.file.close()


def write(path: str | Path, order: list[str], dtypes: dict[str, torch.dtype], shapes: dict[str, tuple],
          metadata: dict[str, str], produce: Callable[[str], Tensor], progress=None) -> None:  # fmt: skip
    """Write tensors in ``order``, each made by ``produce(name)`` only when its turn comes."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        nbytes = torch.Size(shapes[key]).numel() * torch.empty(0, dtype=dtypes[key]).element_size()
        header[key] = {
            "dtype": NAMES[dtypes[key]],
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in order:
            tensor = produce(key)
            if tuple(tensor.shape) != tuple(shapes[key]) or tensor.dtype != dtypes[key]:
                raise AdapterFileError(f"{key}: produced {tuple(tensor.shape)}/{tensor.dtype}, header says "
                                       f"{shapes[key]}/{dtypes[key]}")  # fmt: skip
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            if progress is not None:
                progress(key)
