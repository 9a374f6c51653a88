# ruff: noqa: B023  (each lambda is timed inside the loop iteration that made it)
"""Device time of the fused GEMM (LoRA r16 on every slice) per tile configuration on each of
Flux-dev's adapted layer shapes at 1024² (GPU machine), against cuBLAS (bf16 ``F.linear``; fp8
``torch._scaled_mm``) and the portable bf16 path (cuBLAS + LoRA) on the same shape, the down
projection alone (the fused timing is given h), and the whole model's sum (each shape times its calls
per forward) for every configuration and for the best configuration per shape.

Each variant runs 20 times inside one CUDA graph (no host launch cost in the measure; median of
10 replays). The activations are quantized beforehand: the GEMM alone. The narrow tiles for few
output tiles (``kernels.config_for``) are off here: each configuration runs on every shape. Writes
$OUT/tile_sweep.json.

    OUT=results python benchmarks/tile_sweep.py
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kernel_parts import _lora, portable  # noqa: E402

from loraplug.bench import _graph_time_fn as device_ms  # noqa: E402
from loraplug.fp8 import quantize_per_row  # noqa: E402
from loraplug.runtime import kernels  # noqa: E402
from loraplug.runtime import triton_kernels as tk  # noqa: E402

# name: (tokens, in, out, slices, calls per forward) — 19 double blocks (image 4096 tokens, text
# 512), 38 single blocks (4608)
SHAPES = {
    "linear1": (4608, 3072, 21504, [3072, 3072, 3072, 12288], 38),
    "linear2": (4608, 15360, 3072, [3072], 38),
    "img_qkv": (4096, 3072, 9216, [3072] * 3, 19),
    "img_proj": (4096, 3072, 3072, [3072], 19),
    "img_mlp0": (4096, 3072, 12288, [12288], 19),
    "img_mlp2": (4096, 12288, 3072, [3072], 19),
    "txt_qkv": (512, 3072, 9216, [3072] * 3, 19),
    "txt_proj": (512, 3072, 3072, [3072], 19),
    "txt_mlp0": (512, 3072, 12288, [12288], 19),
    "txt_mlp2": (512, 12288, 3072, [3072], 19),
}
T = kernels.Tiles
# the defaults, then each with Triton's warp specialization of the tile loop (a TMA producer warp
# feeding the MMA warps; on Hopper not with a flattened loop), and the best earlier alternatives
CANDIDATES = {
    "fp8": [
        T(128, 256, 128, 8, 3, True, True),
        T(128, 256, 128, 8, 3, True, False, ws=True),
        T(128, 256, 128, 8, 4, True, False, ws=True),
        T(128, 128, 128, 4, 4, True, True),
        T(128, 128, 128, 4, 4, True, False, ws=True),
    ],
    "bf16": [
        T(128, 256, 64, 8, 3, True, False),
        T(128, 256, 64, 8, 3, True, False, ws=True),
        T(128, 256, 64, 8, 4, True, False, ws=True),
        T(128, 128, 64, 4, 4, True, True),
        T(128, 128, 64, 4, 4, True, False, ws=True),
        T(128, 128, 64, 8, 5, True, False, ws=True),
    ],
}
CANDIDATES = {kind: CANDIDATES[kind] for kind in os.environ.get("KINDS", "fp8 bf16").split()}


def name(t: kernels.Tiles) -> str:
    return f"{t.bm}x{t.bn}x{t.bk}_w{t.warps}_s{t.stages}{'_flat' if t.flatten else ''}{'_ws' if t.ws else ''}"


@torch.no_grad()
def main() -> dict:
    defaults = dict(kernels.CONFIGS)
    kernels.CONFIGS.update(bf16_narrow=None, fp8_narrow=None)
    res: dict = {"device": torch.cuda.get_device_name(), "shapes": {}}
    totals: dict = {}
    for shape, (m, k, n, slices, calls) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        wq, ws = quantize_per_row(w)
        q, sx = tk.quantize_rows(x)
        offs = [sum(slices[:i]) for i in range(len(slices))]
        down_t = torch.randn(k, 16 * len(slices), device="cuda", dtype=x.dtype) * 0.01
        ups = [torch.randn(16, s, device="cuda", dtype=x.dtype) * 0.01 for s in slices]
        row = {
            "calls": calls,
            "down_mm": device_ms(lambda: torch.mm(x, down_t)),
            "portable_bf16": device_ms(lambda: portable(x, w, b, down_t, ups, offs, slices, 16)),
            "cublas_bf16": device_ms(lambda: F.linear(x, w, b)),
            "cublas_fp8": device_ms(
                lambda: torch._scaled_mm(
                    q, wq.t(), scale_a=sx[:, None], scale_b=ws[None, :], bias=b, out_dtype=torch.bfloat16
                )  # fmt: skip
            ),
        }
        for kind, candidates in CANDIDATES.items():
            fp8 = kind == "fp8"
            for tiles in candidates:
                kernels.CONFIGS[kind] = tiles
                packed = _lora(x, k, n, offs, slices, [16], tiles.bn)
                a, scales = (q, (sx, ws)) if fp8 else (x, None)
                key = f"{kind}_{name(tiles)}"
                try:
                    ms = device_ms(
                        lambda: tk.lora_linear(a, wq if fp8 else w, b, packed, scales, torch.bfloat16)
                    )
                except Exception as err:  # noqa: BLE001 (a configuration the compiler rejects: recorded)
                    row[key] = f"{type(err).__name__}"
                    continue
                row[key] = ms
                totals[key] = totals.get(key, 0.0) + calls * ms
            kernels.CONFIGS.update(defaults)
        for kind in CANDIDATES:
            timed = {key: v for key, v in row.items() if key.startswith(kind + "_") and isinstance(v, float)}
            row[f"{kind}_best"] = min(timed, key=timed.get)
            totals[f"{kind}_best_per_shape"] = totals.get(f"{kind}_best_per_shape", 0.0) + calls * min(
                timed.values()
            )
        for ref in ("cublas_bf16", "cublas_fp8", "portable_bf16", "down_mm"):
            totals[ref] = totals.get(ref, 0.0) + calls * row[ref]
        res["shapes"][shape] = row
        print(shape, {key: round(v * 1000, 1) for key, v in row.items() if isinstance(v, float)}, flush=True)
        res["model_totals_ms"] = totals
        Path(os.environ.get("OUT", "."), "tile_sweep.json").write_text(json.dumps(res, indent=1))
    print({key: round(v, 2) for key, v in sorted(totals.items(), key=lambda kv: kv[1])})
    return res


if __name__ == "__main__":
    main()
