"""Would the K-concatenation pay for #10? One LoRA training step's GEMMs per Flux-dev layer shape
at 512² (1536 tokens in the single blocks, 1024 / 512 in the two streams), r16 per slice, bf16, each
form captured in a CUDA graph and timed by replays (CUDA events, median):

    frozen         y = x·Wᵀ + b;                 dx = dy·W
    one_call       the shipped ``train_gemm`` (six GEMMs: h, h·U into y, x·Wᵀ accumulated; g,
                   g·Dᵀ into dx, dy·W accumulated; dDᵀ, dUᵀ)
    kconcat        W stored as [W | U] (N × (K + R)), x as [x | h] (M × (K + R)): y = [x | h]·[W | U]ᵀ + b
                   in one GEMM (h = x·D written into x's buffer); backward [dx₀ | g] = dy·[W | U] in one
                   GEMM, dx = dx₀ + g·Dᵀ, dDᵀ = gᵀ·x, dUᵀ = dyᵀ·h
    kconcat_copy   the same with x copied into the wider buffer first (a producer that cannot
                   write there)
    wide_backward  only W stored as [W | U]: the forward as the one call (x·Wᵀ read from the wide
                   buffer), the backward as ``kconcat``'s (g from the base GEMM, no skinny dy·Uᵀ)

Before timing, every form's y, dx, dD and dU are checked against float32 on a small shape (on a
CPU only that check runs: ``python benchmarks/kconcat_probe.py``). Writes $OUT/kconcat_probe.json
with each form's time per shape, the sum over one Flux-dev step (each shape times its count) and
the ratios to the frozen sum."""

import functools
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraplug.runtime import train_gemm  # noqa: E402

RANK = 16
# (name, tokens, in, out, slices, count in Flux-dev): the adapted layers as diffusers runs them
# after fuse_qkv_projections()
SHAPES = [
    ("single_qkv", 1536, 3072, 9216, 3, 38),
    ("single_proj_mlp", 1536, 3072, 12288, 1, 38),
    ("single_proj_out", 1536, 15360, 3072, 1, 38),
    ("img_qkv", 1024, 3072, 9216, 3, 19),
    ("img_out", 1024, 3072, 3072, 1, 19),
    ("img_mlp0", 1024, 3072, 12288, 1, 19),
    ("img_mlp2", 1024, 12288, 3072, 1, 19),
    ("txt_qkv", 512, 3072, 9216, 3, 19),
    ("txt_out", 512, 3072, 3072, 1, 19),
    ("txt_mlp0", 512, 3072, 12288, 1, 19),
    ("txt_mlp2", 512, 12288, 3072, 1, 19),
]


def operands(
    m: int, k: int, n: int, slices: int, device: str, dtype: torch.dtype, g: torch.Generator
) -> dict:
    """Frozen W, b; D (K × R, scales folded) and the block-diagonal up (R × N); the wide buffers
    [W | U] and [x | h]; x and dy."""

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    r = slices * RANK
    up = torch.zeros(r, n)
    for s in range(slices):
        up[s * RANK : (s + 1) * RANK, s * n // slices : (s + 1) * n // slices] = torch.randn(
            RANK, n // slices, generator=g
        )
    w_wide = torch.empty(n, k + r, device=device, dtype=dtype)
    w_wide[:, :k] = rand(n, k, scale=k**-0.5)
    w_wide[:, k:] = up.T.to(device, dtype)
    x_wide = torch.empty(m, k + r, device=device, dtype=dtype)
    x_wide[:, :k] = rand(m, k)
    return dict(
        w_wide=w_wide, weight=w_wide[:, :k].contiguous(), bias=rand(n), down=rand(k, r, scale=k**-0.5),
        up=up.to(device, dtype), x_wide=x_wide, x=x_wide[:, :k].contiguous(), dy=rand(m, n), k=k,
    )  # fmt: skip


def frozen(o: dict) -> tuple:
    y = torch.addmm(o["bias"], o["x"], o["weight"].t())
    return y, torch.mm(o["dy"], o["weight"])


def one_call(o: dict) -> tuple:
    y, h = train_gemm.forward(o["x"], o["weight"], o["bias"], o["down"], o["up"])
    dx, d_down, d_up = train_gemm.backward(o["dy"], o["x"], o["weight"], h, o["down"], o["up"], True)
    return y, dx, d_down, d_up


def kconcat(o: dict, copy_x: bool = False) -> tuple:
    k, x_wide, w_wide = o["k"], o["x_wide"], o["w_wide"]
    if copy_x:
        x_wide[:, :k].copy_(o["x"])
    x = x_wide[:, :k]
    h = x_wide[:, k:]
    h.copy_(torch.mm(x, o["down"]))  # a GEMM writing there directly would save this small copy
    y = torch.addmm(o["bias"], x_wide, w_wide.t())
    dxg = torch.mm(o["dy"], w_wide)  # [dx₀ | g]
    g = dxg[:, k:]
    dx = torch.addmm(dxg[:, :k], g, o["down"].t())
    return y, dx, torch.mm(g.t(), x).t(), torch.mm(o["dy"].t(), h).t()


def wide_backward(o: dict) -> tuple:
    k, x, w_wide, down = o["k"], o["x"], o["w_wide"], o["down"]
    h = torch.mm(x, down)
    y = torch.addmm(o["bias"], h, w_wide[:, k:].t()).addmm_(x, w_wide[:, :k].t())
    dxg = torch.mm(o["dy"], w_wide)
    g = dxg[:, k:]
    dx = torch.addmm(dxg[:, :k], g, down.t())
    return y, dx, torch.mm(g.t(), x).t(), torch.mm(o["dy"].t(), h).t()


FORMS = {
    "frozen": frozen,
    "one_call": one_call,
    "kconcat": kconcat,
    "kconcat_copy": lambda o: kconcat(o, True),
    "wide_backward": wide_backward,
}


def check(device: str) -> dict:
    """Every LoRA form against float32 on a small shape (relative error of y, dx, dD, dU)."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    o = operands(96, 256, 384, 3, device, dtype, g)
    f32 = {key: v.float() if isinstance(v, Tensor) else v for key, v in o.items()}
    h = f32["x"] @ f32["down"]
    gg = f32["dy"] @ f32["up"].T
    want = (
        f32["x"] @ f32["weight"].T + f32["bias"] + h @ f32["up"],
        f32["dy"] @ f32["weight"] + gg @ f32["down"].T,
        f32["x"].T @ gg,
        h.T @ f32["dy"],
    )
    errors = {}
    for name in ("one_call", "kconcat", "kconcat_copy", "wide_backward"):
        got = FORMS[name](o)
        errors[name] = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True)]
        limit = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert all(e < limit for e in errors[name]), (name, errors[name])
    return errors


def graph_us(fn, replays: int = 50, repeats: int = 7) -> float:
    """Median device time of one call, captured in a CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays)
    return statistics.median(times)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    res["check_relative_errors"] = check(device)
    print(json.dumps(res, indent=1))
    if device != "cuda":
        return
    g = torch.Generator().manual_seed(1)
    totals = dict.fromkeys(FORMS, 0.0)
    for name, m, k, n, slices, count in SHAPES:
        o = operands(m, k, n, slices, device, torch.bfloat16, g)
        row = {form: round(graph_us(functools.partial(fn, o)), 2) for form, fn in FORMS.items()}
        res[name] = row
        for form, us in row.items():
            totals[form] += us * count
        print(name, row, flush=True)
        del o
    res["flux_dev_step_ms"] = {form: round(t / 1e3, 3) for form, t in totals.items()}
    res["vs_frozen"] = {form: round(t / totals["frozen"], 4) for form, t in totals.items()}
    res["lora_extra_ms"] = {form: round((t - totals["frozen"]) / 1e3, 3) for form, t in totals.items()}
    print(json.dumps({key: res[key] for key in ("flux_dev_step_ms", "vs_frozen", "lora_extra_ms")}, indent=1))
    out = Path(os.environ.get("OUT", ".")) / "kconcat_probe.json"
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
