"""One adapted layer's training step (forward + backward, r16, float32 masters, bf16 activations) on
the Flux-dev layer shapes at 512² (1536 tokens in the single blocks, 1024 / 512 in the two streams):
device time per step by kernel (torch.profiler; what CUDA graphs leave), for the frozen layer
(dx only), the portable path (autograd), the one-call GEMMs (float32 masters and bf16 adapters)
and the training kernels. Writes $OUT/train_layer_bench.json."""

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loraplug as lp  # noqa: E402
from loraplug import arch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_flux import is_kernel  # noqa: E402

ITERS = 20
# (name, tokens, in, out, slices): Flux-dev layers as diffusers runs them (fused q/k/v)
SHAPES = [
    ("single_qkv", 1536, 3072, 9216, 3),
    ("single_proj_mlp", 1536, 3072, 12288, 1),
    ("single_proj_out", 1536, 15360, 3072, 1),
    ("img_qkv", 1024, 3072, 9216, 3),
    ("img_out", 1024, 3072, 3072, 1),
    ("img_mlp0", 1024, 3072, 12288, 1),
    ("img_mlp2", 1024, 12288, 3072, 1),
    ("txt_qkv", 512, 3072, 9216, 3),
]
# (name, LORAPLUG_TRAIN_GEMM, LORAPLUG_TRAIN_KERNELS, adapter dtype): one_call_bf16 is the one call
# with bf16 adapters (no casts of float32 masters: what master weights kept outside the layers would cost)
VARIANTS = [
    ("autograd", "0", "0", torch.float32),
    ("one_call", "1", "0", torch.float32),
    ("one_call_bf16", "1", "0", torch.bfloat16),
    ("kernels", "1", "1", torch.float32),
]
SLICES: dict[int, list[str]] = {}
arch.PROVIDERS.append(
    lambda model, ops: (
        {f"s{i}": [arch.Target("layer", i * model.layer.out_features // SLICES[id(model)][0], model.layer.out_features // SLICES[id(model)][0])]
         for i in range(SLICES[id(model)][0])}
        if id(model) in SLICES else {},
        set(),
    )
)  # fmt: skip


def device_ms(fn) -> tuple[float, dict[str, float]]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if is_kernel(e):
            kernels[e.name[:60]] += e.device_time_total / 1e3 / ITERS
    return sum(kernels.values()), dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])


def measure(m: int, k: int, n: int, slices: int, g: torch.Generator) -> dict:
    """Device time of one step of the frozen layer, the portable path and the training kernels."""
    holder = nn.Module()
    holder.layer = nn.Linear(k, n).cuda().bfloat16().requires_grad_(False)
    SLICES[id(holder)] = [slices]
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16().requires_grad_()
    dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    params: list[torch.Tensor] = []

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        holder.layer(x).backward(dy)

    row = {"frozen": device_ms(step)}
    for variant, gemm, kernels, adapter_dtype in VARIANTS:
        os.environ["LORAPLUG_TRAIN_GEMM"], os.environ["LORAPLUG_TRAIN_KERNELS"] = gemm, kernels
        targets = [f"^s{i}$" for i in range(slices)]
        handle = lp.create(holder, "lora", rank=16, targets=targets, init="random", dtype=adapter_dtype)
        params[:] = handle.parameters()
        row[variant] = device_ms(step)
        handle.remove()
        params.clear()
    os.environ.pop("LORAPLUG_TRAIN_KERNELS")
    os.environ.pop("LORAPLUG_TRAIN_GEMM")
    return row


def main():
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "iters": ITERS}
    g = torch.Generator(device="cuda").manual_seed(0)
    total: dict[str, float] = defaultdict(float)
    for name, m, k, n, slices in SHAPES:
        row = measure(m, k, n, slices, g)
        res[name] = {v: {"ms": round(t, 4), "top": top} for v, (t, top) in row.items()}
        for v, (t, _) in row.items():
            total[v] += t
        print(name, {v: round(t * 1e3, 1) for v, (t, _) in row.items()}, "µs", flush=True)
    res["sum_ms"] = {v: round(t, 4) for v, t in total.items()}
    out = Path(os.environ.get("OUT", ".")) / "train_layer_bench.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["sum_ms"]))


if __name__ == "__main__":
    main()
