"""The loraplug error hierarchy: every message names the key and what to do."""

from __future__ import annotations


class LoraplugError(Exception):
    """Base class of every error loraplug raises on bad input."""


class AdapterFileError(LoraplugError):
    """A file could not be read: missing, truncated, not safetensors, unsafe pickle."""


class FormatError(LoraplugError):
    """The tensors do not follow any known adapter key convention."""


class AdapterTensorError(LoraplugError):
    """A tensor of an adapter is unusable: missing partner, wrong rank, NaN/Inf, integer dtype."""


class ShapeMismatchError(LoraplugError):
    """An adapter's shape does not fit the module (or slice) it targets."""


class UnmatchedKeysError(LoraplugError):
    """Adapter keys matched no module of the model (raised when strict=True)."""


class UnsupportedModuleError(LoraplugError):
    """The target module or its weight type cannot run this adapter in this mode."""


class HandleError(LoraplugError):
    """A handle was used after remove(), or with arguments that do not fit it."""


def sample(keys, limit: int = 8) -> str:
    """A short, readable sample of keys for error messages."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return shown + more
