"""What a compiled training step keeps for its backward, frozen against a loraplug LoRA (no GPU
needed): a tiny Flux (one double, one single block, hidden 128, 256 image + 64 text tokens,
q/k/v fused and shared), split by AOTAutograd's min-cut partitioner as Inductor splits it; the
activations the forward saves, each storage counted once (``loraplug.bench.saved_activations``).
Then the LoRA step as ``lp.train(save_memory=True)`` compiles it (``loraplug.train.RECOMPUTE``:
the partitioner free to recompute the pointwise producers of what the backward's GEMMs read).

    python benchmarks/saved_activations.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loraplug as lp  # noqa: E402
from loraplug.bench import saved_activations  # noqa: E402
from loraplug.testing import flux_inputs, tiny_flux  # noqa: E402
from loraplug.train import recompute_config  # noqa: E402


def step(model: torch.nn.Module, input_grad: bool):
    """One training step of ``model`` through a given compile."""

    def run(compile_fn) -> None:
        inputs = {**flux_inputs(image_tokens=256, text_tokens=64), "return_dict": False}
        inputs["hidden_states"].requires_grad_(input_grad)
        compile_fn(model)(**inputs)[0].float().pow(2).mean().backward()

    return run


def total(rows: list) -> int:
    return sum(size for _, _, size in rows)


def main() -> None:
    model = tiny_flux(layers=1, single_layers=1, heads=4, head_dim=32).train().requires_grad_(False)
    model.fuse_qkv_projections()
    lp.share_fused_weights(model)
    frozen = total(saved_activations(step(model, input_grad=True))[0])
    lp.create(model, "lora", rank=4, alpha=4, targets="attn+mlp", init="random")
    lora = total(saved_activations(step(model, input_grad=False))[0])
    print(f"frozen step saves {frozen} B; with LoRA r4 {lora} B ({lora - frozen:+d})")
    with recompute_config():
        rows, backward_ops = saved_activations(step(model, input_grad=False))
    print(f"the same, save_memory=True: {total(rows)} B ({total(rows) - frozen:+d})")
    for name, shape, size in sorted(rows, key=lambda r: -r[2])[:8]:
        print(f"  {size:9d}  {name} {shape}")
    heavy = {
        op: n
        for op, n in backward_ops.items()
        if "lora_under_base_v2.default" in op or "attention_for" in op and "backward" not in op
    }
    print("forward GEMMs or attention recomputed in the backward:", heavy or "none")


if __name__ == "__main__":
    main()
