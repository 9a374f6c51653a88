"""Where a bypass forward spends its time, by kernel: torch.profiler over one forward of the Flux
transformer with and without a LoRA, the device time grouped into base GEMMs, LoRA GEMMs, the
fused kernel, elementwise and attention, written to $OUT/profile_flux.json.

    OUT=results python benchmarks/profile_flux.py          # GPU machine, Flux-dev size
    TINY=1 python benchmarks/profile_flux.py               # any machine: a tiny model, CPU
"""

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
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
        time_us = event.device_time_total if device == "cuda" else event.self_cpu_time_total
        if time_us and (device == "cuda" or event.key.startswith("aten::")):
            totals[kind(event.key)] += time_us / 1e3
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> dict:
    model, inp, device = model_and_inputs()
    model.requires_grad_(False)
    res = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "base_ms": profile_forward(model, inp, device),
    }
    handle = lp.apply(model, lora_for(model))
    assert handle.report.ok, handle.report.unmatched
    res["lora_r16_ms"] = profile_forward(model, inp, device)
    handle.remove()
    Path(os.environ.get("OUT", "."), "profile_flux.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
