"""loraplug: LoRA-family adapters on any PyTorch model, in bypass mode or merged exactly."""

from .adapters import Adapter, AdapterSet
from .api import Handle, apply, load, merge, save
from .arch import Target
from .arch.diffusers import share_fused_weights
from .errors import (
    AdapterFileError,
    AdapterTensorError,
    FormatError,
    HandleError,
    LoraplugError,
    ShapeMismatchError,
    UnmatchedKeysError,
    UnsupportedModuleError,
)
from .fp8 import Fp8Linear, quantize_fp8
from .report import Report
from .train import TrainHandle, TrainResult, create, flow_matching_loss, train

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterFileError",
    "AdapterSet",
    "AdapterTensorError",
    "FormatError",
    "Handle",
    "HandleError",
    "LoraplugError",
    "Report",
    "ShapeMismatchError",
    "Target",
    "UnmatchedKeysError",
    "UnsupportedModuleError",
    "apply",
    "load",
    "merge",
    "save",
    "create",
    "train",
    "flow_matching_loss",
    "TrainHandle",
    "TrainResult",
    "Fp8Linear",
    "quantize_fp8",
    "share_fused_weights",
]
