"""The node classes (ComfyUI's classic node API)."""

from __future__ import annotations

import logging
import uuid

import folder_paths
from comfy.patcher_extension import PatcherInjection

import loraplug as lp

LOG = logging.getLogger("loraplug")


def _attach(patcher, key: str, adapters, strength: float, target: str) -> list[str]:
    """Register an injection on ``patcher`` that applies ``adapters`` in bypass mode on inject
    and removes them on eject. Returns the keys that matched nothing (also logged)."""
    model = patcher.model.diffusion_model if target == "unet" else patcher.model
    probe = lp.apply(model, adapters, strength=strength, strict=False)  # resolve once, to report
    unmatched = sorted(probe.report.unmatched)
    probe.remove()
    handles: dict[int, lp.Handle] = {}

    def inject(mp) -> None:
        root = mp.model.diffusion_model if target == "unet" else mp.model
        handles[id(mp)] = lp.apply(root, adapters, strength=strength, strict=False)

    def eject(mp) -> None:
        handle = handles.pop(id(mp), None)
        if handle is not None:
            handle.remove()

    patcher.set_injections(key, [PatcherInjection(inject=inject, eject=eject)])
    if unmatched:
        LOG.warning(
            "loraplug: %d keys of %s matched no module: %s",
            len(unmatched),
            adapters.name,
            ", ".join(unmatched[:20]),
        )
    return unmatched


class LoraplugLoraLoader:
    """Load LoRA (bypass, loraplug): any algorithm and key convention loraplug reads."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (folder_paths.get_filename_list("loras"),),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            },
            "optional": {
                "clip": ("CLIP",),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    FUNCTION = "load"
    CATEGORY = "loaders/loraplug"

    def load(self, model, lora_name, strength_model, clip=None, strength_clip=1.0):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        adapters = lp.load(path)
        new_model = model.clone()
        unmatched = _attach(new_model, f"loraplug_{uuid.uuid4().hex}", adapters, strength_model, "unet")
        new_clip = clip
        if clip is not None:
            new_clip = clip.clone()
            _attach(new_clip.patcher, f"loraplug_{uuid.uuid4().hex}", adapters, strength_clip, "clip")
        text = f"{lora_name}: {len(adapters) - len(unmatched)} of {len(adapters)} modules matched"
        if unmatched:
            text += f"; unmatched (text-encoder keys apply to CLIP): {', '.join(unmatched[:10])}"
        return {"ui": {"text": [text]}, "result": (new_model, new_clip, text)}


NODE_CLASS_MAPPINGS = {"LoraplugLoraLoader": LoraplugLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraplugLoraLoader": "Load LoRA (bypass, loraplug)"}
