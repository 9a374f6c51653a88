"""FreeFuse in ComfyUI: read the last double block's attention of a Flux model during the first
steps (LoRAs off), turn it into one region mask per LoRA, then run the LoRAs masked."""

from __future__ import annotations

import logging

import torch

from loraplug.freefuse import FreeFuseConfig, attention_bias, concept_maps, masks_from_maps, text_masks

LOG = logging.getLogger("loraplug")


class ComfyFluxProbe:
    """Image queries and text keys of a ComfyUI Flux double block (after QK-norm; RoPE applied to
    the queries as the block does), captured while armed."""

    def __init__(self, block):
        self.block = block
        self.armed = False
        self.query = self.key = self._pe = None
        self._hooks = [
            block.register_forward_pre_hook(self._grab_pe, with_kwargs=True),
            block.img_attn.norm.register_forward_hook(lambda m, a, out: self._keep("query", out[0])),
            block.txt_attn.norm.register_forward_hook(lambda m, a, out: self._keep("key", out[1])),
        ]

    def _grab_pe(self, module, args, kwargs):
        if self.armed:
            self._pe = kwargs.get("pe", args[3] if len(args) > 3 else None)

    def _keep(self, name, out):
        if self.armed:
            setattr(self, name, out.detach().float().transpose(1, 2))  # (B, T, H, D)

    def queries(self):
        from comfy.ldm.flux.math import apply_rope1

        q = self.query
        if self._pe is not None:
            text = self._pe.shape[2] - q.shape[1]
            full = torch.cat([q.new_zeros(q.shape[0], text, *q.shape[2:]), q], 1).transpose(1, 2)
            q = apply_rope1(full, self._pe.float()).transpose(1, 2)[:, text:]
        return q

    def remove(self):
        for h in self._hooks:
            h.remove()


def parse_concepts(text: str) -> list[list[int]]:
    """ "1,2;4" -> [[1, 2], [4]]: token indices per LoRA, LoRAs separated by ';'."""
    return [[int(t) for t in group.split(",") if t.strip()] for group in text.split(";") if group.strip()]


class LoraplugFreeFuseMasks:
    """FreeFuse masks (loraplug): sample the first steps without LoRAs, read the last double block's
    attention at the last of them, return one disjoint region mask per LoRA (+ the text masks)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        return {
            "required": {
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 1000}),
                "collect_step": ("INT", {"default": 5, "min": 1, "max": 1000}),
                "concepts": (
                    "STRING",
                    {"default": "1,2;4", "tooltip": "token indices per LoRA, ';' between LoRAs"},
                ),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0}),
                "top_fraction": ("FLOAT", {"default": 0.10, "min": 0.01, "max": 1.0}),
            }
        }

    RETURN_TYPES = ("MASK", "FREEFUSE")
    RETURN_NAMES = ("masks", "freefuse")
    FUNCTION = "collect"
    CATEGORY = "loaders/loraplug"

    def collect(
        self, model, positive, negative, latent, seed, steps, collect_step, concepts, cfg, top_fraction
    ):
        import comfy.sample

        groups = parse_concepts(concepts)
        config = FreeFuseConfig(collect_step=collect_step, total_steps=steps, top_fraction=top_fraction)
        diffusion = model.model.diffusion_model
        probe = ComfyFluxProbe(diffusion.double_blocks[-1])
        samples = latent["samples"]
        noise = comfy.sample.prepare_noise(samples, seed)
        text_tokens = positive[0][0].shape[1]
        step = {"n": 0}

        def arm(i, *_):
            step["n"] = i
            probe.armed = i + 1 >= collect_step - 1

        probe.armed = collect_step <= 1
        try:
            comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, samples,
                                last_step=collect_step, seed=seed, callback=arm, disable_pbar=True)  # fmt: skip
        finally:
            probe.remove()
        if probe.query is None:
            raise RuntimeError("FreeFuse: no attention was captured; is the model a Flux model?")
        grid = (samples.shape[-2] // 2, samples.shape[-1] // 2)  # Flux packs 2x2 latent patches
        maps = concept_maps(probe.queries(), probe.key, groups, config.top_fraction, [text_tokens - 1])
        masks = masks_from_maps(
            maps, grid, config.balance_iterations, config.balance_rate, config.cleanup_radius
        )
        subject = masks[0, : len(groups)]
        return (subject, {"masks": subject, "text": text_masks(groups, text_tokens), "concepts": groups})


class LoraplugFreeFuseApply:
    """FreeFuse apply (loraplug): the LoRAs (one per concept, in order) on the model, each masked to its
    region and muted at the other subjects' words."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        import folder_paths

        loras = folder_paths.get_filename_list("loras")
        optional = {f"lora_{i}": (["None", *loras],) for i in range(3, 5)}
        optional["attention_bias"] = (
            "BOOLEAN",
            {
                "default": False,
                "tooltip": "FreeFuse's attention bias: "
                "each subject's region and words attend more to each other, less to the others'",
            },
        )
        return {
            "required": {"model": ("MODEL",), "freefuse": ("FREEFUSE",), "lora_1": (loras,), "lora_2": (loras,),
                         "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})},
            "optional": optional,
        }  # fmt: skip

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "loaders/loraplug"

    def apply(
        self, model, freefuse, lora_1, lora_2, strength, lora_3="None", lora_4="None", attention_bias=False
    ):
        import uuid

        import folder_paths
        from comfy.patcher_extension import WrappersMP

        import loraplug as lp

        from .nodes import _attach

        names = [n for n in (lora_1, lora_2, lora_3, lora_4) if n and n != "None"][
            : len(freefuse["concepts"])
        ]
        sets = [lp.load(folder_paths.get_full_path_or_raise("loras", n)) for n in names]
        masks = [freefuse["masks"][i] for i in range(len(sets))]
        new = model.clone()
        key = f"loraplug_{uuid.uuid4().hex}"
        _attach(new, key, sets, [strength] * len(sets), "unet", masks, texts=freefuse["text"][: len(sets)])
        if attention_bias:
            new.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, key, _biased(freefuse, len(sets)))
        return (new,)


def _biased(freefuse: dict, count: int):
    """A DIFFUSION_MODEL wrapper passing FreeFuse's attention bias as the Flux model's
    ``attention_mask`` (added to a float mask already there; skipped, with a warning, where the
    token count is not text + the masks' image grid)."""
    masks, concepts = freefuse["masks"][:count], freefuse["concepts"][:count]
    image_tokens = masks[0].numel()

    cache: dict = {}

    def wrapper(executor, x, timestep, context, *args, **kwargs):
        refs = args[2] if len(args) > 2 else kwargs.get("ref_latents")
        if ((x.shape[-2] + 1) // 2) * ((x.shape[-1] + 1) // 2) != image_tokens or refs is not None:
            LOG.warning("loraplug FreeFuse: the latent does not match the masks' grid; no attention bias")
            return executor(x, timestep, context, *args, **kwargs)
        slot = (context.shape[1], x.device, x.dtype)
        if slot not in cache:  # (T, T) per text length: built once
            cache[slot] = attention_bias(masks[None], concepts, context.shape[1]).to(
                device=x.device, dtype=x.dtype
            )
        present = kwargs.get("attention_mask")
        if present is not None and present.dtype == torch.bool:
            LOG.warning("loraplug FreeFuse: a boolean attention mask is set already; no attention bias")
        else:
            kwargs["attention_mask"] = cache[slot] if present is None else present + cache[slot]
        return executor(x, timestep, context, *args, **kwargs)

    return wrapper
