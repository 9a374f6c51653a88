"""The node classes (ComfyUI's classic node API)."""

from __future__ import annotations

import logging
import uuid

import folder_paths
from comfy.patcher_extension import PatcherInjection

import loraplug as lp

LOG = logging.getLogger("loraplug")


def _attach(patcher, key: str, adapters, strength, target: str, masks=None) -> list[str]:
    """Register an injection on ``patcher`` that applies ``adapters`` (one set or a list) in bypass
    mode on inject, with optional per-set image-space masks, and removes them on eject. Returns
    the keys that matched nothing (also logged)."""
    model = patcher.model.diffusion_model if target == "unet" else patcher.model
    probe = lp.apply(model, adapters, strength=strength, strict=False)  # resolve once, to report
    unmatched = sorted(probe.report.unmatched)
    probe.remove()
    handles: dict[int, lp.Handle] = {}

    def inject(mp) -> None:
        root = mp.model.diffusion_model if target == "unet" else mp.model
        handle = lp.apply(root, adapters, strength=strength, strict=False)
        if masks is not None and any(m is not None for m in masks):
            handle.set_mask([None if m is None else m.float() for m in masks])
        handles[id(mp)] = handle

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
                "mask": ("MASK",),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    FUNCTION = "load"
    CATEGORY = "loaders/loraplug"

    def load(self, model, lora_name, strength_model, clip=None, strength_clip=1.0, mask=None):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        adapters = lp.load(path)
        new_model = model.clone()
        key = f"loraplug_{uuid.uuid4().hex}"
        unmatched = _attach(
            new_model, key, adapters, strength_model, "unet", None if mask is None else [mask]
        )
        new_clip = clip
        if clip is not None:
            new_clip = clip.clone()
            _attach(new_clip.patcher, f"loraplug_{uuid.uuid4().hex}", adapters, strength_clip, "clip")
        text = f"{lora_name}: {len(adapters) - len(unmatched)} of {len(adapters)} modules matched"
        if unmatched:
            text += f"; unmatched (text-encoder keys apply to CLIP): {', '.join(unmatched[:10])}"
        return {"ui": {"text": [text]}, "result": (new_model, new_clip, text)}


class LoraplugLoraStack:
    """Several LoRAs in one loader (one hook per module runs them all), each with its strength and
    an optional region mask (image space: masks map onto every module's token layout)."""

    SLOTS = 4

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        loras = ["None", *folder_paths.get_filename_list("loras")]
        optional = {}
        for i in range(1, cls.SLOTS + 1):
            optional[f"lora_{i}"] = (loras,)
            optional[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})
            optional[f"mask_{i}"] = ("MASK",)
        return {"required": {"model": ("MODEL",)}, "optional": optional}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    FUNCTION = "load"
    CATEGORY = "loaders/loraplug"

    def load(self, model, **slots):
        sets, strengths, masks = [], [], []
        for i in range(1, self.SLOTS + 1):
            name = slots.get(f"lora_{i}", "None")
            if name and name != "None":
                sets.append(lp.load(folder_paths.get_full_path_or_raise("loras", name)))
                strengths.append(float(slots.get(f"strength_{i}", 1.0)))
                masks.append(slots.get(f"mask_{i}"))
        if not sets:
            return {"ui": {"text": ["no LoRA selected"]}, "result": (model, "no LoRA selected")}
        new_model = model.clone()
        unmatched = _attach(new_model, f"loraplug_{uuid.uuid4().hex}", sets, strengths, "unet", masks)
        text = f"{len(sets)} LoRAs stacked" + (
            f"; unmatched: {', '.join(unmatched[:10])}" if unmatched else ""
        )
        return {"ui": {"text": [text]}, "result": (new_model, text)}


NODE_CLASS_MAPPINGS = {"LoraplugLoraLoader": LoraplugLoraLoader, "LoraplugLoraStack": LoraplugLoraStack}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraplugLoraLoader": "Load LoRA (bypass, loraplug)",
    "LoraplugLoraStack": "LoRA stack with masks (bypass, loraplug)",
}
