"""What a compiled training step keeps for its backward, frozen against a loraplug LoRA (no GPU
needed): a tiny Flux (one double, one single block, hidden 128, 256 image + 64 text tokens,
q/k/v fused and shared), split by AOTAutograd's min-cut partitioner as Inductor splits it; the
activations the forward saves, each storage counted once (``loraplug.bench.saved_activations``).
Then the LoRA step as ``lp.train(save_memory=True)`` runs it (``loraplug.train.saving_memory``:
each block under selective activation checkpointing, cheap elementwise tensors recomputed), and
under the narrower ``loraplug.bench.recompute_reshaping`` (only reshaping, concatenations and
activations recomputed). For
reference, what autograd keeps in eager mode (``saved_activations_eager``): the frozen model,
PEFT's LoRA on the split layers (diffusers' ``add_adapter``) and loraplug's on both layouts.

``FLUX_DEV=1``: the same at Flux-dev's sizes in bf16 (hidden 3072, 1024 image + 512 text tokens,
a 512² training step; LoRA r16 on attn+mlp, bf16 adapters), one double and one single block
measured apart and scaled to 19 + 38 blocks; the eager rows for PEFT and the frozen model too.
About a minute on two CPU cores with bf16 matrix units, 3.4 GB of memory.

    python benchmarks/saved_activations.py
    FLUX_DEV=1 python benchmarks/saved_activations.py
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loraplug as lp  # noqa: E402
from loraplug.bench import (  # noqa: E402
    TARGETS,
    gemms_and_attention,
    recompute_reshaping,
    saved_activations,
    saved_activations_eager,
)
from loraplug.testing import flux_inputs, tiny_flux  # noqa: E402
from loraplug.train import saving_memory  # noqa: E402


def tiny_inputs() -> dict:
    return {**flux_inputs(image_tokens=256, text_tokens=64), "return_dict": False}


def step(model: torch.nn.Module, input_grad: bool, make_inputs=tiny_inputs):
    """One training step of ``model`` on ``make_inputs()``, compiled by a given function
    (``run(compile_fn)``) or eager (``run()``)."""

    def run(compile_fn=lambda m: m) -> None:
        inputs = make_inputs()
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


def flux_dev_model(double: int, single: int) -> torch.nn.Module:
    """Flux-dev's embedders and final layer with ``double`` + ``single`` of its blocks, bf16, frozen."""
    from diffusers import FluxTransformer2DModel

    from loraplug.bench import CFG

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**CFG, "num_layers": double, "num_single_layers": single})
    return model.to(torch.bfloat16).train().requires_grad_(False)


def flux_dev_step(model: torch.nn.Module, input_grad: bool):
    """A 512² training step's forward and backward (1024 image + 512 text tokens), as ``step``."""
    from loraplug.bench import inputs

    return step(model, input_grad, lambda: inputs(image_tokens=1024, device="cpu"))


def flux_dev_kept(double: int, single: int) -> dict[str, int]:
    """Bytes kept for the backward by each kind of step on Flux-dev's embedders and blocks (without
    blocks: the frozen step's, the input's gradient flowing through the final layer as the
    adapters' gradients do)."""
    from peft import LoraConfig

    model = flux_dev_model(double, single)
    kept = {
        "eager frozen": saved_activations_eager(flux_dev_step(model, True), model),
        "compiled frozen": total(saved_activations(flux_dev_step(model, True))[0]),
    }
    if not double + single:  # the embedders and final layer: what any step keeps there
        return {
            **kept,
            PEFT: kept["eager frozen"],
            LORAPLUG: kept["compiled frozen"],
            SAVING: kept["compiled frozen"],
            RESHAPING: kept["compiled frozen"],
        }
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian"))
    kept[PEFT] = saved_activations_eager(flux_dev_step(model, False), model)
    model = flux_dev_model(double, single)
    model.fuse_qkv_projections()
    lp.share_fused_weights(model)
    lp.create(model, "lora", rank=16, alpha=16, targets="attn+mlp", init="random", dtype=torch.bfloat16)
    kept[LORAPLUG] = total(saved_activations(flux_dev_step(model, False))[0])
    with saving_memory(model):
        kept[SAVING] = total(saved_activations(flux_dev_step(model, False))[0])
    with saving_memory(model, policy=recompute_reshaping):
        kept[RESHAPING] = total(saved_activations(flux_dev_step(model, False))[0])
    return kept


PEFT, LORAPLUG = "eager PEFT LoRA r16", "compiled loraplug LoRA r16"
SAVING = "compiled loraplug LoRA r16, save_memory=True"
RESHAPING = "the same, recompute_reshaping (a probe)"


def flux_dev() -> None:
    """Kept for the backward at Flux-dev's sizes: the embedders and final layer once, one double
    and one single block measured apart (each less the embedders), scaled to 19 + 38 blocks."""
    ends = flux_dev_kept(0, 0)
    double, single = flux_dev_kept(1, 0), flux_dev_kept(0, 1)
    print("kept for the backward, MB per block and GB at 19 double + 38 single blocks:")
    for name in double:
        per_double, per_single = double[name] - ends[name], single[name] - ends[name]
        whole = (19 * per_double + 38 * per_single + ends[name]) / 1e9
        print(
            f"  {name:46s} double {per_double / 1e6:6.1f}  single {per_single / 1e6:6.1f}  all {whole:6.2f}"
        )


if __name__ == "__main__":
    flux_dev() if os.environ.get("FLUX_DEV") == "1" else main()
