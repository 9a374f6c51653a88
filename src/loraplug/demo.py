"""``loraplug demo``: two diffusers-format LoRAs on a tiny fused Flux, offline, on CPU."""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from . import api
from .arch.diffusers import share_fused_weights
from .testing import flux_inputs, tiny_flux


def diffusers_lora_file(model, path: Path, rank: int, alpha: float, seed: int) -> Path:
    """A random LoRA in diffusers' Flux format (split to_q/to_k/to_v, ``transformer.`` prefix,
    alpha in ``lora_adapter_metadata``), as diffusers' save_lora_weights writes it."""
    g = torch.Generator().manual_seed(seed)
    targets = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_out.0",
        "proj_mlp",
        "proj_out",
    )
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets) and "blocks" in name:
            tensors[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=g) * 0.3
            )
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=g) * 0.3
            )
    meta = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.use_rslora": False}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def _median_ms(fn, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(console: Console | None = None) -> dict:
    """Run the demo, print what happens, return the numbers (for tests)."""
    console = console or Console()
    torch.manual_seed(0)
    model = tiny_flux(layers=2, single_layers=4, heads=4, head_dim=16)
    model.fuse_qkv_projections()
    shared = share_fused_weights(model)  # diffusers keeps the split q/k/v copies too
    inputs = flux_inputs(image_tokens=64, text_tokens=8)
    console.rule("[bold]loraplug demo")
    console.print(
        "tiny Flux transformer (diffusers), q/k/v fused into [cyan]to_qkv[/cyan] / [cyan]to_added_qkv[/cyan]; "
        f"share_fused_weights: {shared / 1e3:.0f} kB of split q/k/v copies now views of the fused weights"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        files = [
            diffusers_lora_file(model, Path(tmp) / f"lora_{c}.safetensors", rank=r, alpha=a, seed=s)
            for c, r, a, s in (("a", 8, 8.0, 1), ("b", 4, 2.0, 2))
        ]
        adapters = [api.load(f) for f in files]
    for ad in adapters:
        console.print(
            f"loaded [green]{ad.name}[/green]: format={ad.format} algorithms={ad.algorithms} "
            f"parameters={ad.parameters:,}"
        )
    strengths = [1.0, 0.8]
    with torch.no_grad():
        base_out = model(**inputs)[0]
        handle = api.apply(model, adapters, strength=strengths)
        console.print(handle.report.table())
        bypass_out = model(**inputs)[0]
        bypass_ms = _median_ms(lambda: model(**inputs))
        handle.disable()
        base_ms = _median_ms(lambda: model(**inputs))
        handle.enable()
        merged = api.merge(reference, adapters, strength=strengths)
        merged_out = reference(**inputs)[0]
        merged.remove()
        handle.remove()
        after_out = model(**inputs)[0]
    diff = (bypass_out - merged_out).abs().max().item()
    moved = (bypass_out - base_out).abs().max().item()
    identical = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    table = Table(title="result")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_row("max |bypass − merged|", f"{diff:.2e}")
    table.add_row("max |bypass − base| (the LoRAs act)", f"{moved:.2e}")
    table.add_row("base forward, ms (median)", f"{base_ms:.2f}")
    table.add_row("bypass forward, 2 LoRAs, ms (median)", f"{bypass_ms:.2f}")
    table.add_row("model bit-identical after remove()", "yes" if identical else "NO")
    table.add_row("output after remove() == base", "yes" if torch.equal(after_out, base_out) else "NO")
    console.print(table)
    ok = diff < 1e-4 and moved > 1e-3 and identical and torch.equal(after_out, base_out)
    console.print("[bold green]demo passed[/bold green]" if ok else "[bold red]demo FAILED[/bold red]")
    return {
        "ok": ok,
        "max_diff": diff,
        "moved": moved,
        "identical": identical,
        "unmatched": len(handle.report.unmatched),
        "fused": len(handle.report.fused),
        "base_ms": base_ms,
        "bypass_ms": bypass_ms,
        "shared_bytes": shared,
    }
