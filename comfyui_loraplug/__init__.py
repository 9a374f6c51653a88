"""loraplug for ComfyUI: bypass LoRA loaders that stack, on any weight type and any key convention.

Install: copy or link this folder into ComfyUI/custom_nodes/ and ``pip install loraplug`` into
ComfyUI's Python. Each loader returns a patched clone whose adapters run beside the model's own
(possibly fp8) weights through a ModelPatcher injection keyed per loader, so chained loaders stack,
and ComfyUI's model management (clones, device moves, unpatching) keeps working.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
