# ruff: noqa: B023  (each lambda is timed inside the loop iteration that made it)
"""Device time of the fp8 activation quantization with and without the adapters' down projection
in the same pass, per tile configuration, on Flux-dev's adapted layer shapes (GPU machine).

Each variant runs 20 times inside one CUDA graph (host launch costs out of the measure; the
median of 10 replays / 20): ``quantize_rows`` alone, ``quantize_rows`` then the cuBLAS down GEMM
(the shipped path), and ``quantize_rows_and_down`` for every (rows per program, reduction step,
warps, stages) in ``TILES``. Writes $OUT/quantize_down_sweep.json.

    OUT=results python benchmarks/quantize_down_sweep.py
"""

import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loraplug.runtime import triton_kernels as tk  # noqa: E402

# (tokens, in features, adapters' total rank): linear1 and image qkv with r16 per slice, then
# the r16 layers with the widest inputs (single blocks' linear2, the image MLP's second layer)
SHAPES = {
    "linear1": (4608, 3072, 64),
    "img_qkv": (4096, 3072, 48),
    "img_proj": (4096, 3072, 16),
    "linear2": (4608, 15360, 16),
    "img_mlp2": (4096, 12288, 16),
}
TILES = list(itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (2, 3, 4)))
REPEAT = 20


def device_ms(fn) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph of ``REPEAT`` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEAT):
            fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / REPEAT)
    return statistics.median(times)


@torch.no_grad()
def main() -> dict:
    res: dict = {"device": torch.cuda.get_device_name(), "repeat": REPEAT}
    for name, (m, k, r) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        down_t = torch.randn(k, r, device="cuda", dtype=torch.bfloat16) * 0.01
        row = {
            "quantize_rows": device_ms(lambda: tk.quantize_rows(x)),
            "down_mm": device_ms(lambda: torch.mm(x, down_t)),
            "quantize_rows_then_down_mm": device_ms(lambda: (tk.quantize_rows(x), torch.mm(x, down_t))),
        }
        fused = {}
        for tiles in TILES:
            try:
                fused["x".join(map(str, tiles))] = device_ms(
                    lambda: tk.quantize_rows_and_down(x, down_t, tiles)
                )
            except Exception as e:  # noqa: BLE001 (a configuration out of resources: recorded, skipped)
                fused["x".join(map(str, tiles))] = f"{type(e).__name__}"
        timed = {t: v for t, v in fused.items() if isinstance(v, float)}
        best = min(timed, key=timed.get)
        row |= {"fused_best": best, "fused_best_ms": timed[best], "fused": fused}
        res[name] = row
        print(name, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}, best, flush=True)
        Path(os.environ.get("OUT", "."), "quantize_down_sweep.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
