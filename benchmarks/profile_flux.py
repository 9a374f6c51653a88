"""Where a bypass forward spends its time, by kernel: torch.profiler over one forward of the Flux
transformer with and without a LoRA, on the bf16 and on the fp8 base, the device time grouped into
GEMMs, the fused kernel, fp8 quantization, elementwise and attention, against the forward's wall
time (device time well under wall time: the host, not the GPU, sets the pace), written to
$OUT/profile_flux.json; and the host time of one call of each path on a tiny layer (launch cost).

    OUT=results python benchmarks/profile_flux.py          # GPU machine, Flux-dev size
    TINY=1 python benchmarks/profile_flux.py               # any machine: a tiny model, CPU
"""

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import loraplug as lp

TINY = os.environ.get("TINY") == "1" or not torch.cuda.is_available()
CLASSES = (  # kernel-name fragments -> what they are (first match wins)
    ("lora_linear", "fused lora kernel"), ("quantize_rows", "fp8 quantization"),
    ("flash", "attention"), ("attention", "attention"), ("sdpa", "attention"),
    ("gemm", "GEMM"), ("gemv", "GEMM"), ("addmm", "GEMM"), ("mm", "GEMM"), ("cutlass", "GEMM"),
    ("nvjet", "GEMM"), ("xmma", "GEMM"),
)  # fmt: skip


def kind(name: str) -> str:
    low = name.lower()
    return next((what for frag, what in CLASSES if frag in low), "other (elementwise, norms, copies)")


def model_and_inputs():
    if TINY:
        from loraplug.testing import flux_inputs, tiny_flux

        return tiny_flux().eval(), flux_inputs(), "cpu"
    from diffusers import FluxTransformer2DModel

    from loraplug.bench import CFG, DEV, DT, inputs

    torch.manual_seed(0)
    with torch.device(DEV):
        model = FluxTransformer2DModel(**CFG).to(DT).eval()
    return model, inputs(), DEV


def lora_for(model, rank: int = 16) -> dict:
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "blocks." in name and not name.endswith("norm.linear"):
            p = next(mod.parameters())
            sd[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, mod.in_features, device=p.device, dtype=p.dtype) * 0.01
            )
            sd[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(mod.out_features, rank, device=p.device, dtype=p.dtype) * 0.01
            )
    return sd


def is_kernel(event) -> bool:
    """A device event that is a kernel, copy or memset: not a user annotation's range (the
    optimizer's ``Optimizer.step#AdamW.step`` shows as a device event spanning its kernels, whose
    time it would count twice; found in session 20)."""
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def device_profile(fn) -> dict:
    """One call of ``fn`` under torch.profiler: device milliseconds by kind of kernel, their sum,
    the number of kernel launches and the top kernels."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        if is_kernel(event) and event.self_device_time_total:
            totals[kind(event.key)] += event.self_device_time_total / 1e3
            kernels.append((event.self_device_time_total / 1e3, event.count, event.key[:90]))
    kernels.sort(reverse=True)
    return {
        "by_kind": {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "device_total": round(sum(totals.values()), 3),
        "launches": sum(count for _, count, _ in kernels),
        "top": [
            f"{ms:.3f} ms x{count} {name}"
            for ms, count, name in kernels[: int(os.environ.get("PROFILE_TOP", 10))]
        ],
    }


@torch.no_grad()
def profile_forward(model, inp, device: str) -> dict:
    for _ in range(2):
        model(**inp)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        model(**inp)
        if device == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if device == "cuda":  # kernels only (an aten op's entry repeats its kernels' time)
            time_us = event.self_device_time_total if is_kernel(event) else 0
        else:
            time_us = event.self_cpu_time_total if event.key.startswith("aten::") else 0
        if time_us:
            totals[kind(event.key)] += time_us / 1e3
    out = {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    out["device_total"] = round(sum(totals.values()), 3)
    if device == "cuda":
        from loraplug.bench import _time_fn

        out["wall"] = round(_time_fn(lambda: model(**inp), iters=5), 3)
    return out


def host_cost(device: str, calls: int = 2000) -> dict:
    """Host microseconds per call of each path on a tiny layer (the GPU does almost nothing):
    what eager mode pays per module before the GPU sees any work."""
    import time

    from loraplug.fp8 import quantize_fp8

    def per_call(fn) -> float:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t
        torch.cuda.synchronize()
        return round(elapsed / calls * 1e6, 2)

    holder = torch.nn.Module()
    holder.layer = torch.nn.Linear(256, 256, device=device, dtype=torch.bfloat16)
    x = torch.randn(64, 256, device=device, dtype=torch.bfloat16)
    sd = {
        "layer.lora_A.weight": torch.randn(16, 256, device=device, dtype=torch.bfloat16),
        "layer.lora_B.weight": torch.randn(256, 16, device=device, dtype=torch.bfloat16),
    }
    res = {"linear": per_call(lambda: holder.layer(x))}
    with torch.no_grad():
        for mode, env in (("portable", "0"), ("fused", "all")):
            os.environ["LORAPLUG_KERNELS"] = env
            handle = lp.apply(holder, sd)
            res[f"lora_{mode}"] = per_call(lambda: holder.layer(x))
            handle.remove()
        os.environ.pop("LORAPLUG_KERNELS")
        quantize_fp8(holder)
        res["fp8_linear"] = per_call(lambda: holder.layer(x))
        handle = lp.apply(holder, sd)
        res["fp8_lora_fused"] = per_call(lambda: holder.layer(x))
        handle.remove()
        from loraplug.runtime import kernels

        kernels.CONFIGS["fp8"] = kernels.config(True)._replace(device_desc=False)
        res["fp8_linear_host_descriptors"] = per_call(lambda: holder.layer(x))
        kernels.CONFIGS["fp8"] = kernels.config(True)._replace(device_desc=True)
        res.update(fused_parts_host_cost(holder.layer, x, sd, per_call))
    return res


def _through_triton(launch) -> None:
    """A launch through Triton's own launcher: the kept binaries forgotten first."""
    from loraplug.runtime import triton_kernels

    for kernel in (triton_kernels._TMA_KERNEL, triton_kernels._QUANTIZE_KERNEL):
        kernel.kept.clear()
    launch()


def fused_parts_host_cost(layer, x, sd, per_call) -> dict:
    """The fp8 + fused LoRA call taken apart: each Triton launch directly (kept binary, and through
    Triton's launcher) and through the operator (how compiled graphs call it; with the activations'
    quantization inside), whole compiled layers, and where the custom op's host time
    goes (cProfile, top functions by own time)."""
    import cProfile
    import io
    import pstats

    from loraplug.runtime import kernels, triton_kernels

    holder = torch.nn.Module()
    holder.layer = layer
    res = {}
    q, s = triton_kernels.quantize_rows(x)
    res["quantize_rows_launch"] = per_call(lambda: triton_kernels.quantize_rows(x))
    h = torch.zeros(x.shape[0], 16, device=x.device, dtype=x.dtype)
    packing = kernels.pack_ups([(0, 16, 0, layer.out_features)], [sd["layer.lora_B.weight"].T], layer.out_features, kernels.config(True).bn)  # fmt: skip
    scale = torch.ones(16, device=x.device, dtype=torch.float32)
    lora = (h, packing.hstart, scale, packing.packed)
    args = (q, layer.weight, None, h, None, *lora[1:], s, layer.weight_scale, x.dtype)
    launch = lambda: triton_kernels.lora_linear(q, layer.weight, None, lora, (s, layer.weight_scale), x.dtype)  # noqa: E731
    res["lora_linear_launch"] = per_call(launch)
    res["lora_linear_jit_launch"] = per_call(lambda: _through_triton(launch))
    res["lora_linear_op"] = per_call(lambda: kernels.ops().lora_linear(*args))
    # as compiled graphs call it: x quantized and h = x·down_t computed inside
    down_t = sd["layer.lora_A.weight"].T
    inside = (x, layer.weight, None, None, down_t, *lora[1:], None, layer.weight_scale, x.dtype)
    res["lora_linear_op_quantizing"] = per_call(lambda: kernels.ops().lora_linear(*inside))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        kernels.ops().lora_linear(*args)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    res["lora_linear_op_cprofile"] = text.getvalue().splitlines()[-22:]
    for name, env in (("compiled_fp8_lora", None), ("compiled_fp8_lora_fused", "all")):
        if env:
            os.environ["LORAPLUG_KERNELS"] = env
        handle = lp.apply(holder, sd)
        torch._dynamo.reset()
        compiled = torch.compile(holder.layer)
        res[name] = per_call(lambda compiled=compiled: compiled(x))
        handle.remove()
        os.environ.pop("LORAPLUG_KERNELS", None)
    torch._dynamo.reset()
    compiled = torch.compile(holder.layer)
    res["compiled_fp8_linear"] = per_call(lambda: compiled(x))
    torch._dynamo.reset()
    return res


def main() -> dict:
    if os.environ.get("HOST_ONLY") == "1":  # only the host cost per call of each path (seconds)
        res = {"device": torch.cuda.get_device_name(), "host_us_per_call": host_cost("cuda")}
        Path(os.environ.get("OUT", "."), "host_cost.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return res
    model, inp, device = model_and_inputs()
    model.requires_grad_(False)
    res = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "base_ms": profile_forward(model, inp, device),
    }
    sd = lora_for(model)
    handle = lp.apply(model, sd)
    assert handle.report.ok, handle.report.unmatched
    res["lora_r16_ms"] = profile_forward(model, inp, device)
    handle.remove()
    if device == "cuda":
        from loraplug.fp8 import quantize_fp8

        quantize_fp8(model, targets=r"blocks\.")
        res["fp8_base_ms"] = profile_forward(model, inp, device)
        handle = lp.apply(model, sd)
        res["fp8_lora_r16_ms"] = profile_forward(model, inp, device)
        handle.remove()
        res["host_us_per_call"] = host_cost(device)
    Path(os.environ.get("OUT", "."), "profile_flux.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
