"""What a compiled training step keeps for its backward, frozen against a loraplug LoRA (no GPU
needed): a tiny Flux (one double, one single block, hidden 128, 256 image + 64 text tokens,
q/k/v fused and shared), split by AOTAutograd's min-cut partitioner as Inductor splits it; the
activations the forward saves, each storage counted once (``loraplug.bench.saved_activations``).
Then the LoRA step as ``lp.train(save_memory=True)`` runs it (``loraplug.train.saving_memory``:
each block under selective activation checkpointing, cheap elementwise tensors recomputed). For
reference, what autograd keeps in eager mode (``saved_activations_eager``): the frozen model,
PEFT's LoRA on the split layers (diffusers' ``add_adapter``) and loraplug's on both layouts.

    python benchmarks/saved_activations.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loraplug as lp  # noqa: E402
from loraplug.bench import TARGETS, gemms_and_attention, saved_activations, saved_activations_eager  # noqa: E402
from loraplug.testing import flux_inputs, tiny_flux  # noqa: E402
from loraplug.train import saving_memory  # noqa: E402


def step(model: torch.nn.Module, input_grad: bool):
    """One training step of ``model``, compiled by a given function (``run(compile_fn)``) or eager
    (``run()``)."""

    def run(compile_fn=lambda m: m) -> None:
        inputs = {**flux_inputs(image_tokens=256, text_tokens=64), "return_dict": False}
        inputs["hidden_states"].requires_grad_(input_grad)
        compile_fn(model)(**inputs)[0].float().pow(2).mean().backward()

    return run


def tiny(fused: bool) -> torch.nn.Module:
    model = tiny_flux(layers=1, single_layers=1, heads=4, head_dim=32).train().requires_grad_(False)
    if fused:
        model.fuse_qkv_projections()
        lp.share_fused_weights(model)
    return model


def eager() -> None:
    from peft import LoraConfig

    model = tiny(fused=False)
    print(f"eager: frozen step keeps {saved_activations_eager(step(model, True), model)} B")
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    print(f"eager: PEFT LoRA r4 (split layers) {saved_activations_eager(step(model, False), model)} B")
    for fused in (False, True):
        model = tiny(fused)
        lp.create(model, "lora", rank=4, alpha=4, targets="attn+mlp", init="random")
        kept = saved_activations_eager(step(model, False), model)
        print(f"eager: loraplug LoRA r4 ({'fused q/k/v' if fused else 'split layers'}) {kept} B")


def total(rows: list) -> int:
    return sum(size for _, _, size in rows)


def main() -> None:
    eager()
    model = tiny(fused=True)
    frozen = total(saved_activations(step(model, input_grad=True))[0])
    lp.create(model, "lora", rank=4, alpha=4, targets="attn+mlp", init="random")
    kept, backward_ops = saved_activations(step(model, input_grad=False))
    print(f"frozen step saves {frozen} B; with LoRA r4 {total(kept)} B ({total(kept) - frozen:+d})")
    with saving_memory(model):
        kept, saving_ops = saved_activations(step(model, input_grad=False))
    print(f"the same, save_memory=True: {total(kept)} B ({total(kept) - frozen:+d})")
    for name, shape, size in sorted(kept, key=lambda r: -r[2])[:8]:
        print(f"  {size:9d}  {name} {shape}")
    same = gemms_and_attention(saving_ops) == gemms_and_attention(backward_ops)
    print(
        "GEMMs and attention in the backward:", "as without it" if same else gemms_and_attention(saving_ops)
    )


if __name__ == "__main__":
    main()
