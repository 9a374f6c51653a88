# ruff: noqa: B023  (each lambda is timed inside the loop iteration that made it)
"""Where the fused path's time goes, per kernel, on the largest Flux-dev layers (GPU machine).

Times each part alone (CUDA events, median of 20) for single_blocks.N.linear1 (4608 tokens,
3072 -> 21504, LoRA r16 on q, k, v, mlp slices) and the image qkv (4096 tokens, 3072 -> 9216):
cuBLAS base, the portable LoRA after it (down GEMM, one addmm_ per slice), the down projection,
fp8 row quantization, and the Triton GEMM (bf16 and fp8) without and with the LoRA tail — one
LoRA r16 (one 16-rank step per tile), two r16 and one r64 (a pipelined loop of steps) — with the
tile loop flattened or not (Tiles.flatten).

    OUT=results python benchmarks/kernel_parts.py
"""

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from loraplug.bench import _time_fn
from loraplug.fp8 import quantize_per_row
from loraplug.runtime import kernels
from loraplug.runtime import triton_kernels as tk

SHAPES = {
    "linear1": (4608, 3072, 21504, [3072, 3072, 3072, 12288]),
    "img_qkv": (4096, 3072, 9216, [3072] * 3),
}
RANKS = {"r16": [16], "2x_r16": [16, 16], "r64": [64]}


def _lora(x, k, n, offs, slices, ranks, bn=None):
    """(h, hstart, rank scales, P) for LoRAs of ``ranks`` on every slice, as the runtime lays them
    (for output tiles of width ``bn``; default: the bf16 configuration's)."""
    spans, ups, start = [], [], 0
    for o, s in zip(offs, slices, strict=True):
        for r in ranks:
            spans.append((start, r, o, s))
            ups.append(torch.randn(r, s, device="cuda", dtype=x.dtype) * 0.01)
            start += r
    packing = kernels.pack_ups(spans, ups, n, bn or kernels.config(False).bn)
    assert packing.columns is None
    down_t = torch.randn(k, start, device="cuda", dtype=x.dtype) * 0.01
    return x @ down_t, packing.hstart, torch.ones(start, device="cuda", dtype=x.dtype), packing.packed


def portable(x, w, b, down_t, ups, offs, slices, rank):
    """The portable bf16 path by hand: cuBLAS base GEMM, one down GEMM for every slice's adapter,
    then an in-place ``addmm_`` of each slice's up projection."""
    y = F.linear(x, w, b)
    hid = torch.mm(x, down_t)
    for i, (o, s) in enumerate(zip(offs, slices, strict=True)):
        y[:, o : o + s].addmm_(hid[:, i * rank : (i + 1) * rank], ups[i])
    return y


@torch.no_grad()
def main(rank: int = 16) -> dict:
    defaults = dict(kernels.CONFIGS)
    res = {"device": torch.cuda.get_device_name(), "configs": {k: list(v) for k, v in defaults.items()}}
    dt = torch.bfloat16
    for name, (m, k, n, slices) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=dt)
        w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
        b = torch.randn(n, device="cuda", dtype=dt)
        r = rank * len(slices)
        down_t = torch.randn(k, r, device="cuda", dtype=dt) * 0.01
        offs = [sum(slices[:i]) for i in range(len(slices))]
        ups = [torch.randn(rank, s, device="cuda", dtype=dt) * 0.01 for s in slices]
        wq, ws = quantize_per_row(w)
        q, sx = tk.quantize_rows(x)

        t = {
            "cublas_base": lambda: F.linear(x, w, b),
            "cublas_base_plus_portable_lora": lambda: portable(x, w, b, down_t, ups, offs, slices, rank),
            "down_projection_mm": lambda: torch.mm(x, down_t),
            "quantize_rows": lambda: tk.quantize_rows(x),
            "quantize_rows_then_down_mm": lambda: (tk.quantize_rows(x), torch.mm(x, down_t)),
        }
        for key, fn in t.items():
            res[f"{name}_{key}_ms"] = round(_time_fn(fn, iters=20), 4)
        loras = {key: _lora(x, k, n, offs, slices, ranks) for key, ranks in RANKS.items()}
        for flatten in (True, False):
            for fp8 in (False, True):
                kernels.CONFIGS["fp8" if fp8 else "bf16"] = kernels.config(fp8)._replace(flatten=flatten)
            suffix = "flat" if flatten else "nested"
            runs = {
                "triton_base": lambda: tk.lora_linear(x, w, b, None),
                "fp8_triton_base": lambda: tk.lora_linear(q, wq, b, None, (sx, ws), dt),
            }
            for key, lora in loras.items():
                runs[f"triton_{key}"] = lambda: tk.lora_linear(x, w, b, lora)
                runs[f"fp8_triton_{key}"] = lambda: tk.lora_linear(q, wq, b, lora, (sx, ws), dt)
            for key, fn in runs.items():
                try:
                    res[f"{name}_{key}_{suffix}_ms"] = round(_time_fn(fn, iters=20), 4)
                except Exception as err:  # a variant the compiler rejects
                    res[f"{name}_{key}_{suffix}_error"] = f"{type(err).__name__}: {err}"[:300]
        kernels.CONFIGS.update(defaults)
        for key in sorted(k for k in res if k.startswith(name) and k.endswith("_ms")):
            print(f"{key:50s} {res[key]:8.3f} ms", flush=True)
    Path(os.environ.get("OUT", "."), "kernel_parts.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
