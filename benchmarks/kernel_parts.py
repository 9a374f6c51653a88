# ruff: noqa: B023  (each lambda is timed inside the loop iteration that made it)
"""Where the fused path's time goes, per kernel, on the largest Flux-dev layers (GPU machine).

Times each part alone (CUDA events, median of 20) for single_blocks.N.linear1 (4608 tokens,
3072 -> 21504, LoRA r16 on q, k, v, mlp slices) and the image qkv (4096 tokens, 3072 -> 9216):
cuBLAS base, the portable LoRA after it (down GEMM, one addmm_ per slice), the Triton GEMM without
and with the LoRA tail under each tail variant (Tiles.tail × Tiles.flatten), the down projection,
fp8 row quantization, the fp8 GEMM without and with the tail.

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
VARIANTS = {
    "tma_after": (0, True),
    "ptr_before": (2, True),
    "tma_after_nf": (0, False),
    "ptr_before_nf": (2, False),
}


def _use(fp8: bool, tail: int, flatten: bool) -> None:
    key = "fp8" if fp8 else "bf16"
    kernels.CONFIGS[key] = kernels.config(fp8)._replace(tail=tail, flatten=flatten)


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
        spans = [(i * rank, rank, o, s) for i, (o, s) in enumerate(zip(offs, slices, strict=True))]
        ups = [torch.randn(rank, s, device="cuda", dtype=dt) * 0.01 for s in slices]
        packing = kernels.pack_ups(spans, ups, n, kernels.config(False).bn)
        assert packing.columns is None
        rs = torch.ones(r, device="cuda", dtype=dt)
        h = x @ down_t
        lora = (h, packing.hstart, rs, packing.packed)
        wq, ws = quantize_per_row(w)
        q, sx = tk.quantize_rows(x)

        def portable():
            y = F.linear(x, w, b)
            hid = torch.mm(x, down_t)
            for i, (o, s) in enumerate(zip(offs, slices, strict=True)):
                y[:, o : o + s].addmm_(hid[:, i * rank : (i + 1) * rank], ups[i])

        t = {
            "cublas_base": lambda: F.linear(x, w, b),
            "cublas_base_plus_portable_lora": portable,
            "down_projection_mm": lambda: torch.mm(x, down_t),
            "quantize_rows": lambda: tk.quantize_rows(x),
        }
        for key, fn in t.items():
            res[f"{name}_{key}_ms"] = round(_time_fn(fn, iters=20), 4)
        for vname, (tail, flatten) in VARIANTS.items():
            for fp8 in (False, True):
                _use(fp8, tail, flatten)
            runs = {
                "triton_base": lambda: tk.lora_linear(x, w, b, None),
                "triton_with_tail": lambda: tk.lora_linear(x, w, b, lora),
                "fp8_triton_base": lambda: tk.lora_linear(q, wq, b, None, (sx, ws), dt),
                "fp8_triton_with_tail": lambda: tk.lora_linear(q, wq, b, lora, (sx, ws), dt),
            }
            for key, fn in runs.items():
                if key.endswith("base") and tail == 2:
                    continue  # the tail variant does not change a run without adapters
                try:
                    res[f"{name}_{key}_{vname}_ms"] = round(_time_fn(fn, iters=20), 4)
                except Exception as err:  # a variant the compiler rejects
                    res[f"{name}_{key}_{vname}_error"] = f"{type(err).__name__}: {err}"[:300]
        kernels.CONFIGS.update(defaults)
        for key in sorted(k for k in res if k.startswith(name) and k.endswith("_ms")):
            print(f"{key:50s} {res[key]:8.3f} ms", flush=True)
    Path(os.environ.get("OUT", "."), "kernel_parts.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
