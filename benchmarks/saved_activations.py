"""What a compiled training step keeps for its backward, frozen against a loraplug LoRA (no GPU
needed): a tiny Flux (one double, one single block, hidden 128, 256 image + 64 text tokens,
q/k/v fused and shared), compiled through AOTAutograd with the min-cut partitioner Inductor uses;
the forward graph's saved activations, each storage counted once (views followed to their
base), in bytes. Then the same with ``torch._functorch.config.ban_recompute_materialized_backward``
off (``flux_train_bench.py``'s ``*_recompute`` layouts), which lets the partitioner recompute
pointwise producers (GELU's output, say) of tensors an extern kernel reads in the backward.

    python benchmarks/saved_activations.py
"""

import torch
import torch._functorch.config as functorch_config
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

import loraplug as lp
from loraplug.testing import flux_inputs, tiny_flux

VIEWS = {"view", "_unsafe_view", "permute", "slice", "reshape", "expand", "select", "transpose",
         "unsqueeze", "squeeze", "t", "detach", "alias", "as_strided"}  # fmt: skip


def _op(node: torch.fx.Node) -> str:
    target = str(node.target)
    return target.split(".")[1] if target.startswith("aten.") else target.split(".")[-1]


def _base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose storage ``node`` views."""
    while node.op == "call_function" and _op(node) in VIEWS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def saved_bytes(model: torch.nn.Module, input_grad: bool) -> tuple[int, list[tuple[str, tuple, int]]]:
    """Bytes of the activations one compiled training step saves (inputs and parameters not
    counted), and (name, shape, bytes) of each."""
    saved: list[tuple[str, tuple, int]] = []

    def forward_compiler(gm: torch.fx.GraphModule, _):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        bases = {_base(n) for n in outputs if isinstance(n, torch.fx.Node)}
        for node in bases:
            value = node.meta.get("val")
            if node.op != "placeholder" and isinstance(value, torch.Tensor):
                saved.append((node.name, tuple(value.shape), value.numel() * value.element_size()))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    inputs = flux_inputs(image_tokens=256, text_tokens=64)
    inputs["hidden_states"].requires_grad_(input_grad)
    inputs["return_dict"] = False
    out = torch.compile(model, backend=backend)(**inputs)[0]
    out.float().pow(2).mean().backward()
    torch._dynamo.reset()
    return sum(b for _, _, b in saved), saved


def main() -> None:
    model = tiny_flux(layers=1, single_layers=1, heads=4, head_dim=32).train().requires_grad_(False)
    model.fuse_qkv_projections()
    lp.share_fused_weights(model)
    frozen, _ = saved_bytes(model, input_grad=True)
    lp.create(model, "lora", rank=4, alpha=4, targets="attn+mlp", init="random")
    lora, _ = saved_bytes(model, input_grad=False)
    print(f"frozen step saves {frozen} B; with LoRA r4 {lora} B (+{lora - frozen})")
    with functorch_config.patch(ban_recompute_materialized_backward=False):
        recomputed, rows = saved_bytes(model, input_grad=False)
    print(f"the partitioner free to recompute for extern kernels: {recomputed} B (+{recomputed - frozen})")
    for name, shape, size in sorted(rows, key=lambda r: -r[2])[:12]:
        print(f"  {size:9d}  {name} {shape}")


if __name__ == "__main__":
    main()
