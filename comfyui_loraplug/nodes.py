"""The node classes (ComfyUI's classic node API)."""

from __future__ import annotations

import logging
import uuid
import warnings

import folder_paths
from comfy.patcher_extension import PatcherInjection, WrappersMP

import loraplug as lp

LOG = logging.getLogger("loraplug")


def _attach(patcher, key: str, adapters, strength, target: str, masks=None, texts=None, handles=None,
            other_components_applied: bool = False) -> list[str]:  # fmt: skip
    """Register an injection on ``patcher`` that applies ``adapters`` (one set or a list) in bypass
    mode on inject, with optional per-set image-space masks, and removes them on eject (``handles``,
    if given, holds the live handles by patcher). Returns the keys that matched nothing (also
    logged). ``other_components_applied``: the file's text-encoder keys go to a CLIP loaded beside
    (no warning that they were left out here)."""
    model = patcher.model.diffusion_model if target == "unet" else patcher.model

    def apply(root):
        with warnings.catch_warnings():
            if other_components_applied:
                warnings.filterwarnings("ignore", message=".*adapter keys are for")
            return lp.apply(root, adapters, strength=strength, strict=False)

    probe = apply(model)  # resolve once, to report
    unmatched = sorted(probe.report.unmatched)
    probe.remove()
    handles = {} if handles is None else handles

    def inject(mp) -> None:
        root = mp.model.diffusion_model if target == "unet" else mp.model
        handle = apply(root)
        if masks is not None and any(m is not None for m in masks):
            handle.set_mask([None if m is None else m.float() for m in masks], text=texts)
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
        unmatched = _attach(new_model, key, adapters, strength_model, "unet", None if mask is None else [mask],
                            other_components_applied=clip is not None)  # fmt: skip
        new_clip = clip
        if clip is not None:
            new_clip = clip.clone()
            _attach(new_clip.patcher, f"loraplug_{uuid.uuid4().hex}", adapters, strength_clip, "clip",
                    other_components_applied=True)  # fmt: skip
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


class LoraplugLoraSchedule:
    """Load LoRA with a strength schedule (bypass, loraplug): the strength goes linearly from
    ``strength_start`` to ``strength_end`` between ``start_percent`` and ``end_percent`` of the
    sampling (ComfyUI's percent: through the model's own sigma schedule), and holds outside. Each
    step only rewrites the strength in place: nothing is re-patched and nothing recompiles."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        percent = {"min": 0.0, "max": 1.0, "step": 0.001}
        strength = {"min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (folder_paths.get_filename_list("loras"),),
                "strength_start": ("FLOAT", {"default": 1.0, **strength}),
                "strength_end": ("FLOAT", {"default": 0.0, **strength}),
                "start_percent": ("FLOAT", {"default": 0.0, **percent}),
                "end_percent": ("FLOAT", {"default": 1.0, **percent}),
            }
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    FUNCTION = "load"
    CATEGORY = "loaders/loraplug"

    def load(self, model, lora_name, strength_start, strength_end, start_percent, end_percent):
        adapters = lp.load(folder_paths.get_full_path_or_raise("loras", lora_name))
        new_model = model.clone()
        key = f"loraplug_{uuid.uuid4().hex}"
        handles: dict[int, lp.Handle] = {}
        unmatched = _attach(new_model, key, adapters, strength_start, "unet", handles=handles)
        schedule = StrengthSchedule(strength_start, strength_end, start_percent, end_percent)

        def apply_model(executor, x, t, *args, **kwargs):
            strength = schedule.at(sigma_percent(executor.class_obj.model_sampling, float(t.flatten()[0])))
            for handle in handles.values():
                if handle.strength != [strength]:
                    handle.set_strength(strength)
            return executor(x, t, *args, **kwargs)

        new_model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, key, apply_model)
        text = (
            f"{lora_name}: {len(adapters) - len(unmatched)} of {len(adapters)} modules matched; strength "
            f"{strength_start:g} → {strength_end:g} over {start_percent:g}–{end_percent:g} of sampling"
        )
        if unmatched:
            text += f"; unmatched: {', '.join(unmatched[:10])}"
        return {"ui": {"text": [text]}, "result": (new_model, text)}


class StrengthSchedule:
    """Strength as a function of sampling progress (0 = first step, 1 = end): ``start`` up to
    ``begin``, linear to ``end`` at ``finish``, ``end`` after."""

    def __init__(self, start: float, end: float, begin: float, finish: float):
        self.start, self.end, self.begin, self.finish = start, end, begin, finish

    def at(self, progress: float) -> float:
        if progress <= self.begin:
            return self.start
        if progress >= self.finish:
            return self.end
        return self.start + (self.end - self.start) * (progress - self.begin) / (self.finish - self.begin)


def sigma_percent(model_sampling, sigma: float) -> float:
    """The sampling progress at ``sigma``: the inverse of ``model_sampling.percent_to_sigma``
    (decreasing in percent), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if model_sampling.percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class LoraplugTrainLora:
    """Train LoRA (bypass, loraplug): fresh adapters beside the loaded (possibly fp8) model, trained
    on latents and one conditioning with the model's own noise schedule (denoised-prediction loss).
    Returns the adapters and the loss list, not a trained MODEL: load the saved file to use it."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        return {
            "required": {
                "model": ("MODEL",),
                "latents": ("LATENT",),
                "positive": ("CONDITIONING",),
                "algorithm": (["lora", "loha", "lokr", "oft", "boft"],),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256}),
                "targets": (["attn", "attn+mlp", "all-linear"],),
                "steps": ("INT", {"default": 200, "min": 1, "max": 100000}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            }
        }

    RETURN_TYPES = ("LORAPLUG_ADAPTERS", "LOSS_LIST")
    RETURN_NAMES = ("adapters", "losses")
    FUNCTION = "train"
    CATEGORY = "training/loraplug"

    def train(self, model, latents, positive, algorithm, rank, targets, steps, learning_rate, seed):
        import torch

        base = model.model
        diffusion = base.diffusion_model
        x0 = base.process_latent_in(latents["samples"]).to(torch.float32)
        cond, extras = positive[0][0], positive[0][1]
        pooled = extras.get("pooled_output")
        sampling = base.model_sampling
        generator = torch.Generator().manual_seed(seed)
        handle = lp.create(diffusion, algorithm, rank=rank, targets=targets, seed=seed)

        def loss_fn(batch):
            u = torch.rand(batch.shape[0], generator=generator).clamp(0.02, 0.98)
            sigma = torch.stack([torch.as_tensor(sampling.percent_to_sigma(float(v))) for v in u]).to(batch)
            noise = torch.randn(batch.shape, generator=generator).to(batch)
            noisy = sampling.noise_scaling(sigma.reshape(-1, *([1] * (batch.dim() - 1))), noise, batch)
            kwargs = {"y": pooled} if pooled is not None else {}
            denoised = base.apply_model(noisy, sigma, c_crossattn=cond, **kwargs)
            return torch.nn.functional.mse_loss(denoised.float(), batch)

        blocks = [
            m for child in diffusion.children() if isinstance(child, torch.nn.ModuleList) for m in child
        ]
        originals = [b.forward for b in blocks]
        for block, forward in zip(blocks, originals, strict=True):  # checkpointed, as ComfyUI trains
            block.forward = _checkpointed(forward)
        try:
            with torch.inference_mode(False):
                result = lp.train(handle, [x0], loss_fn, steps=steps, lr=learning_rate, seed=seed)
        finally:
            handle.remove()
            for block in blocks:
                del block.forward
        return ({"result": result, "model": diffusion}, result.losses)


def _checkpointed(forward):
    """The block recomputed in the backward pass, on copies of its tensor inputs (ComfyUI's blocks
    add into their inputs in place, which autograd cannot otherwise differentiate)."""
    import torch
    import torch.utils.checkpoint

    def on_copies(*args, **kwargs):
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(on_copies, *args, use_reentrant=False, **kwargs)

    return run


class LoraplugSaveLora:
    """Save LoRA (loraplug): ``comfy`` (ComfyUI's own loader reads it; per-slice LoRAs of a fused
    module are written as one exact fused LoRA), ``kohya`` or ``peft``, into ComfyUI's loras folder."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        return {
            "required": {
                "adapters": ("LORAPLUG_ADAPTERS",),
                "filename_prefix": ("STRING", {"default": "loraplug"}),
                "format": (["comfy", "kohya", "peft"],),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "training/loraplug"

    def save(self, adapters, filename_prefix, format):
        import os

        folder = folder_paths.get_folder_paths("loras")[0]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{filename_prefix}.safetensors")
        lp.save(adapters["result"], path, format=format, model=adapters["model"])
        return {"ui": {"text": [path]}, "result": (path,)}


from .freefuse import LoraplugFreeFuseApply, LoraplugFreeFuseMasks  # noqa: E402

NODE_CLASS_MAPPINGS = {
    "LoraplugFreeFuseMasks": LoraplugFreeFuseMasks,
    "LoraplugFreeFuseApply": LoraplugFreeFuseApply,
    "LoraplugLoraLoader": LoraplugLoraLoader,
    "LoraplugLoraStack": LoraplugLoraStack,
    "LoraplugLoraSchedule": LoraplugLoraSchedule,
    "LoraplugTrainLora": LoraplugTrainLora,
    "LoraplugSaveLora": LoraplugSaveLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraplugLoraLoader": "Load LoRA (bypass, loraplug)",
    "LoraplugLoraStack": "LoRA stack with masks (bypass, loraplug)",
    "LoraplugLoraSchedule": "Load LoRA with strength schedule (bypass, loraplug)",
    "LoraplugTrainLora": "Train LoRA (bypass, loraplug)",
    "LoraplugSaveLora": "Save LoRA (loraplug)",
    "LoraplugFreeFuseMasks": "FreeFuse masks (loraplug)",
    "LoraplugFreeFuseApply": "FreeFuse apply (loraplug)",
}
