"""Fine-tune a tiny Flux-like transformer with a LoRA in bypass mode, on CPU, in well under a minute.

    python examples/train_tiny_flux.py [steps] [--regional] [--save-memory]

``--regional`` trains under torch.compile, each block kind compiled once (``regional=True``);
``--save-memory`` runs each block under selective activation checkpointing (``save_memory=True``:
the backward recomputes the cheap elementwise tensors instead of keeping them).

The base is frozen (here fused q/k/v, as a fast runtime would hold it); the LoRA trains per slice
and is saved under the split diffusers names, which diffusers, ComfyUI and loraplug all load.
"""

import sys

import torch

import loraplug as lp
from loraplug.testing import flux_inputs, tiny_flux


def main(
    steps: int = 60,
    out: str = "tiny_flux_lora.safetensors",
    regional: bool = False,
    save_memory: bool = False,
) -> lp.TrainResult:
    torch.manual_seed(0)
    model = tiny_flux()
    model.fuse_qkv_projections()
    lp.share_fused_weights(model)  # one copy of the q/k/v weights (diffusers keeps the split ones)
    handle = lp.create(model, "lora", rank=4, alpha=4, targets="attn+mlp")
    conditioning = flux_inputs(
        batch=8, image_tokens=16, text_tokens=6
    )  # one latent and prompt, 8 noise draws
    latents = conditioning.pop("hidden_states")[:1].expand(8, -1, -1)
    for key in ("timestep", "return_dict"):
        conditioning.pop(key)
    for key in ("encoder_hidden_states", "pooled_projections"):
        conditioning[key] = conditioning[key][:1].expand(8, *conditioning[key].shape[1:])
    generator = torch.Generator().manual_seed(0)

    def loss_fn(batch):
        return lp.flow_matching_loss(model, batch, generator=generator, **conditioning)

    result = lp.train(handle, [latents], loss_fn, steps=steps, lr=1e-2, schedule="cosine",
                      compile=regional, regional=regional, save_memory=save_memory)  # fmt: skip
    lp.save(result, out, format="peft", metadata={"base_model": "tiny-flux"})
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    print(f"loss {first:.4f} -> {last:.4f} (mean of the first and last 5 steps); saved {out}")
    return result


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(
        int(args[0]) if args else 60,
        regional="--regional" in sys.argv,
        save_memory="--save-memory" in sys.argv,
    )
