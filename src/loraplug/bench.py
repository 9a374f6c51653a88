"""GPU benchmark (``loraplug bench``): loraplug bypass on the full diffusers FluxTransformer2DModel
at Flux-dev size.

Random weights, bf16, 1024x1024 (4096 image + 512 text tokens), one GPU. Every variant is timed in
this one process with CUDA events (3 warm-ups, median of ITERS) and reported as a ratio to the base
measured in the same run. Writes JSON to $OUT (or .).

    loraplug bench [--compile] [--blocks 2 4]       # or: python benchmarks/flux_bench.py
    loraplug bench --results results.json           # a saved run as a table
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.table import Table

from . import api as lp

DEV, DT = "cuda", torch.bfloat16
ITERS = int(os.environ.get("ITERS", 10))
CFG = dict(
    patch_size=1, in_channels=64, num_layers=int(os.environ.get("ND", 19)),
    num_single_layers=int(os.environ.get("NS", 38)), attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)  # fmt: skip
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "proj_mlp", "proj_out")  # fmt: skip
T_IMG, T_TXT = 4096, 512


def inputs() -> dict:
    g = torch.Generator(device=DEV).manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, T_IMG, 64, device=DEV, dtype=DT, generator=g),
        encoder_hidden_states=torch.randn(1, T_TXT, 4096, device=DEV, dtype=DT, generator=g),
        pooled_projections=torch.randn(1, 768, device=DEV, dtype=DT, generator=g),
        timestep=torch.tensor([0.5], device=DEV, dtype=DT),
        guidance=torch.tensor([3.5], device=DEV, dtype=DT),
        img_ids=torch.zeros(T_IMG, 3, device=DEV),
        txt_ids=torch.zeros(T_TXT, 3, device=DEV),
        return_dict=False,
    )


def diffusers_lora(model, rank: int, seed: int) -> dict:
    """A diffusers-format LoRA (split q/k/v names) on every projection of every block."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "blocks." in name and name.endswith(TARGETS):
            sd[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, mod.in_features, device=DEV, dtype=DT, generator=g) * 0.01
            )
            sd[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(mod.out_features, rank, device=DEV, dtype=DT, generator=g) * 0.01
            )
    return sd


class Bench:
    def __init__(self):
        self.res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        self.inp = inputs()

    @torch.no_grad()
    def time(self, model, name: str) -> float:
        for _ in range(3):
            model(**self.inp)
        torch.cuda.synchronize()
        times = []
        for _ in range(ITERS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**self.inp)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        self.res[name + "_ms"] = statistics.median(times)
        print(f"{name:36s} {self.res[name + '_ms']:8.2f} ms", flush=True)
        return self.res[name + "_ms"]

    def memory(self, name: str) -> None:
        self.res[name + "_GB"] = torch.cuda.memory_allocated() / 1e9


def table(results: dict) -> Table:
    """The ratios of a run (each against the base measured in that run) as a rich table."""
    t = Table(title=f"loraplug bench — {results.get('device', '?')}, torch {results.get('torch', '?')}")
    t.add_column("variant")
    t.add_column("ms", justify="right")
    t.add_column("ratio", justify="right")
    for key, value in results.items():
        if key.endswith("_ratio"):
            name = key.removesuffix("_ratio")
            t.add_row(name, f"{results.get(name + '_ms', float('nan')):.1f}", f"{value:.3f}")
    return t


def main() -> None:
    from diffusers import FluxTransformer2DModel

    b = Bench()
    torch.manual_seed(0)
    with torch.device(DEV):
        model = FluxTransformer2DModel(**CFG).to(DT).eval().requires_grad_(False)
    b.time(model, "base")
    loras = {r: lp.load(diffusers_lora(model, r, seed=r)) for r in (16, 64)}
    second = lp.load(diffusers_lora(model, 16, seed=99))
    for layout in ("split", "fused") if os.environ.get("EAGER", "1") == "1" else ():
        if layout == "fused":
            model.fuse_qkv_projections()
            b.time(model, "base_fused")
        b.memory(f"{layout}_base")
        for r, ad in loras.items():
            handle = lp.apply(model, ad)
            assert handle.report.ok, handle.report.unmatched
            b.time(model, f"loraplug_{layout}_r{r}")
            b.memory(f"{layout}_r{r}")
            b.res[f"{layout}_r{r}_adapter_GB"] = ad.parameters * 2 / 1e9
            handle.remove()
        handle = lp.apply(model, [loras[16], second], strength=[1.0, 0.8])
        b.time(model, f"loraplug_{layout}_2x_r16")
        handle.set_strength([0.5, 0.5])
        b.time(model, f"loraplug_{layout}_2x_r16_restrength")
        handle.remove()
        merged = lp.merge(model, loras[16])
        b.time(model, f"merged_{layout}_r16")
        merged.remove()
    compiled = None
    if os.environ.get("EAGER", "1") != "1":
        model.fuse_qkv_projections()
    if os.environ.get("COMPILE") == "1":
        t0 = time.time()
        compiled = torch.compile(model)
        b.time(compiled, "compiled_base_fused")
        b.res["compile_base_s"] = time.time() - t0
        handle = lp.apply(model, loras[16])
        torch._dynamo.reset()
        compiled = torch.compile(model)
        b.time(compiled, "compiled_loraplug_fused_r16")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for s in (0.2, 0.7, 1.3):
                handle.set_strength(s)
                b.time(compiled, f"compiled_loraplug_fused_r16_s{s}")
        b.res["compiled_no_recompile_on_strength"] = True
        handle.remove()
    if os.environ.get("PEFT", "1") == "1":  # last: PEFT leaves its wrappers in the model
        from peft import LoraConfig

        del compiled
        try:
            model.unfuse_qkv_projections()
            names = [t.split(".", 1)[1] if t.startswith("attn.") else t for t in TARGETS]
            model.add_adapter(
                LoraConfig(r=16, lora_alpha=16, target_modules=names, init_lora_weights=False), "p"
            )
            b.time(model, "peft_r16")
            model.add_adapter(
                LoraConfig(r=16, lora_alpha=16, target_modules=names, init_lora_weights=False), "q"
            )
            model.set_adapters(["p", "q"], [1.0, 0.8])
            b.time(model, "peft_2x_r16")
        except Exception as err:  # PEFT is a reference here, not the subject
            b.res["peft_error"] = f"{type(err).__name__}: {err}"[:300]
    base = b.res["base_ms"]
    for key in [k for k in b.res if k.endswith("_ms") and k != "base_ms"]:
        ref = b.res["compiled_base_fused_ms"] if key.startswith("compiled_loraplug") else base
        b.res[key.replace("_ms", "_ratio")] = round(b.res[key] / ref, 4)
    out = Path(os.environ.get("OUT", ".")) / os.environ.get("NAME", "flux_bench.json")
    out.write_text(json.dumps(b.res, indent=1))
    print(json.dumps({k: v for k, v in b.res.items() if k.endswith("_ratio")}, indent=1))


if __name__ == "__main__":
    main()
