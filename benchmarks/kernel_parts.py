# ruff: noqa: B023  (each lambda is timed inside the loop iteration that made it)
"""Where the fused path's time goes, per kernel, on the largest Flux-dev layers (GPU machine).

Times each part alone (CUDA events, median of 20) for single_blocks.N.linear1 (4608 tokens,
3072 -> 21504, LoRA r16 on q, k, v, mlp slices) and the image qkv (4096 tokens, 3072 -> 9216):
cuBLAS base, the Triton GEMM without and with the LoRA tail, the down projection, fp8 row
quantization without and with the fused down projection, the fp8 GEMM without and with the tail.

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


@torch.no_grad()
def main(rank: int = 16) -> dict:
    res = {"device": torch.cuda.get_device_name(), "configs": dict(kernels.CONFIGS)}
    dt = torch.bfloat16
    for name, (m, k, n, slices) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=dt)
        w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
        b = torch.randn(n, device="cuda", dtype=dt)
        r = rank * len(slices)
        down_t = torch.randn(k, r, device="cuda", dtype=dt) * 0.01
        offs = [sum(slices[:i]) for i in range(len(slices))]
        spans = [(i * rank, rank, o, s) for i, (o, s) in enumerate(zip(offs, slices, strict=True))]
        ups = [torch.randn(rank, s, device="cuda", dtype=dt) * 0.01 for s in slices]
        idx, packed = kernels.pack_ups(spans, ups, n, kernels.config(False)[1])
        rs = torch.ones(r, device="cuda", dtype=dt)
        h = x @ down_t
        wq, ws = quantize_per_row(w)
        q, sx, _ = tk.quantize_rows(x, None)
        t = {
            "cublas_base": lambda: F.linear(x, w, b),
            "cublas_base_plus_addmm_per_slice": lambda: [
                F.linear(x, w, b)[:, o : o + s].addmm_(h[:, i * rank : (i + 1) * rank], ups[i])
                for i, (o, s) in enumerate(zip(offs, slices, strict=True))
            ],
            "down_projection_mm": lambda: torch.mm(x, down_t),
            "triton_base": lambda: tk.lora_linear(x, w, b, None),
            "triton_with_tail": lambda: tk.lora_linear(x, w, b, (h, idx, rs, packed)),
            "quantize_rows": lambda: tk.quantize_rows(x, None),
            "quantize_rows_with_down": lambda: tk.quantize_rows(x, down_t),
            "fp8_triton_base": lambda: tk.lora_linear(q, wq, b, None, (sx, ws), dt),
            "fp8_triton_with_tail": lambda: tk.lora_linear(q, wq, b, (h, idx, rs, packed), (sx, ws), dt),
        }
        for tail, suffix in ((0, "_tail_last"), (1, "_tail_first"), (2, "_tail_prefetched")):
            for fp8 in (False, True):
                cfg = list(kernels.CONFIGS["fp8" if fp8 else "bf16"])
                cfg[6] = tail
                kernels.CONFIGS["fp8" if fp8 else "bf16"] = tuple(cfg)
            t["triton_with_tail" + suffix] = lambda: tk.lora_linear(x, w, b, (h, idx, rs, packed))
            t["fp8_triton_with_tail" + suffix] = lambda: tk.lora_linear(
                q, wq, b, (h, idx, rs, packed), (sx, ws), dt
            )
            for key in ("triton_with_tail", "fp8_triton_with_tail"):
                res[f"{name}_{key}{suffix}_ms"] = round(_time_fn(t.pop(key + suffix), iters=20), 4)
        kernels.CONFIGS.update(res["configs"])
        for key, fn in t.items():
            res[f"{name}_{key}_ms"] = round(_time_fn(fn, iters=20), 4)
            print(f"{name:8s} {key:34s} {res[f'{name}_{key}_ms']:8.3f} ms", flush=True)
    Path(os.environ.get("OUT", "."), "kernel_parts.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
