"""Would the K-concatenation pay for #10 (and #11)? One LoRA training step's GEMMs per Flux-dev layer shape
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

and the forward alone at 1024² (4608 / 4096 / 512 tokens; #11's inference), against the base GEMM:

    base           y = x·Wᵀ + b
    portable       the same, then h = x·D and y += h·U in place (cuBLAS only; the fused Triton
                   kernel's times per shape are in tile_sweep.py's results)
    kconcat, kconcat_copy   y = [x | h]·[W | U]ᵀ + b as above

Before timing, every form's outputs (y, dx, dD, dU) are checked against float32 on a small shape (on
a CPU only that check runs: ``python benchmarks/kconcat_probe.py``). Writes $OUT/kconcat_probe.json
with each form's time per shape, the sums over one Flux-dev step (each shape times its count) and
the ratios to the frozen / base sums."""

import functools
import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraplug.bench import _graph_time_fn  # noqa: E402  (one CUDA graph of repeated calls, median of replays)
from loraplug.runtime import train_gemm  # noqa: E402

RANK = 16
PAD = int(os.environ.get("PAD", 64))  # kconcat_pad: ranks padded to a multiple of this
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


# the same layers at 1024² (4096 image + 512 text tokens), forward only
INFERENCE_SHAPES = [(name, {1536: 4608, 1024: 4096, 512: 512}[m], *rest) for name, m, *rest in SHAPES]


def operands(
    m: int, k: int, n: int, slices: int, device: str, dtype: torch.dtype, g: torch.Generator
) -> dict:
    """Frozen W, b; D (K × R, scales folded) and the block-diagonal up (R × N); the wide buffers
    [W | U] and [x | h], and the same with R padded by zero ranks to a multiple of ``PAD`` (K + R a
    whole number of 64-wide K steps, rows 128-byte aligned: ``*_pad``); x and dy."""

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    r = slices * RANK
    up = torch.zeros(r, n)
    for s in range(slices):
        up[s * RANK : (s + 1) * RANK, s * n // slices : (s + 1) * n // slices] = torch.randn(
            RANK, n // slices, generator=g
        )
    weight, x, down = rand(n, k, scale=k**-0.5), rand(m, k), rand(k, r, scale=k**-0.5)
    o = dict(weight=weight, bias=rand(n), down=down, up=up.to(device, dtype), x=x, dy=rand(m, n), k=k, r=r)
    for suffix, width in (("", r), ("_pad", -(-r // PAD) * PAD)):
        w_wide = torch.zeros(n, k + width, device=device, dtype=dtype)
        w_wide[:, :k] = weight
        w_wide[:, k : k + r] = o["up"].T
        x_wide = torch.zeros(m, k + width, device=device, dtype=dtype)
        x_wide[:, :k] = x
        down_wide = torch.zeros(k, width, device=device, dtype=dtype)
        down_wide[:, :r] = down
        o.update({"w_wide" + suffix: w_wide, "x_wide" + suffix: x_wide, "down_wide" + suffix: down_wide})
    return o


def frozen(o: dict) -> tuple:
    y = torch.addmm(o["bias"], o["x"], o["weight"].t())
    return y, torch.mm(o["dy"], o["weight"])


def one_call(o: dict) -> tuple:
    y, h = train_gemm.forward(o["x"], o["weight"], o["bias"], o["down"], o["up"])
    dx, d_down, d_up = train_gemm.backward(o["dy"], o["x"], o["weight"], h, o["down"], o["up"], True)
    return y, dx, d_down, d_up


def kconcat_forward(o: dict, copy_x: bool = False, pad: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """(y, x, h) with y = [x | h]·[W | U]ᵀ + b, x and h views of the wide buffer (``pad="_pad"``:
    the zero-padded buffers)."""
    k, x_wide, w_wide = o["k"], o["x_wide" + pad], o["w_wide" + pad]
    if copy_x:
        x_wide[:, :k].copy_(o["x"])
    x = x_wide[:, :k]
    h = x_wide[:, k:]
    h.copy_(torch.mm(x, o["down_wide" + pad]))  # a GEMM writing there directly would save this small copy
    return torch.addmm(o["bias"], x_wide, w_wide.t()), x, h


def kconcat(o: dict, copy_x: bool = False, pad: str = "") -> tuple:
    y, x, h = kconcat_forward(o, copy_x, pad)
    k, r, w_wide, down = o["k"], o["r"], o["w_wide" + pad], o["down_wide" + pad]
    dxg = torch.mm(o["dy"], w_wide)  # [dx₀ | g]
    g = dxg[:, k:]
    dx = torch.addmm(dxg[:, :k], g, down.t())
    return y, dx, torch.mm(g.t(), x).t()[:, :r], torch.mm(o["dy"].t(), h).t()[:r]


def wide_backward(o: dict) -> tuple:
    k, x, w_wide, down = o["k"], o["x"], o["w_wide"], o["down"]
    h = torch.mm(x, down)
    y = torch.addmm(o["bias"], h, w_wide[:, k:].t()).addmm_(x, w_wide[:, :k].t())
    dxg = torch.mm(o["dy"], w_wide)
    g = dxg[:, k:]
    dx = torch.addmm(dxg[:, :k], g, down.t())
    return y, dx, torch.mm(g.t(), x).t(), torch.mm(o["dy"].t(), h).t()


def portable_forward(o: dict) -> tuple:
    y = torch.addmm(o["bias"], o["x"], o["weight"].t())
    return (y.addmm_(torch.mm(o["x"], o["down"]), o["up"]),)


FORMS = {
    "frozen": frozen,
    "one_call": one_call,
    "kconcat": kconcat,
    "kconcat_copy": lambda o: kconcat(o, True),
    "kconcat_pad": lambda o: kconcat(o, pad="_pad"),
    "wide_backward": wide_backward,
}
INFERENCE_FORMS = {
    "base": lambda o: (torch.addmm(o["bias"], o["x"], o["weight"].t()),),
    "portable": portable_forward,
    "kconcat": lambda o: kconcat_forward(o)[:1],
    "kconcat_copy": lambda o: kconcat_forward(o, True)[:1],
    "kconcat_pad": lambda o: kconcat_forward(o, pad="_pad")[:1],
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
    forms = [(name, FORMS[name]) for name in FORMS if name != "frozen"]
    forms += [(f"forward_{name}", INFERENCE_FORMS[name]) for name in INFERENCE_FORMS if name != "base"]
    for name, form in forms:
        got = form(o)
        errors[name] = [
            ((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, want[: len(got)], strict=True)
        ]
        limit = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert all(e < limit for e in errors[name]), (name, errors[name])
    return errors


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
    out = Path(os.environ.get("OUT", ".")) / "kconcat_probe.json"
    for suite, shapes, forms, reference in (
        ("training_512", SHAPES, FORMS, "frozen"),
        ("inference_1024", INFERENCE_SHAPES, INFERENCE_FORMS, "base"),
    ):
        totals = dict.fromkeys(forms, 0.0)
        rows = res[suite] = {}
        for name, m, k, n, slices, count in shapes:
            o = operands(m, k, n, slices, device, torch.bfloat16, g)
            rows[name] = {
                form: round(_graph_time_fn(functools.partial(fn, o)) * 1e3, 2) for form, fn in forms.items()
            }
            for form, us in rows[name].items():
                totals[form] += us * count
            print(suite, name, rows[name], flush=True)
            del o
        rows["flux_dev_ms"] = {form: round(t / 1e3, 3) for form, t in totals.items()}
        rows["ratio"] = {form: round(t / totals[reference], 4) for form, t in totals.items()}
        rows["lora_extra_ms"] = {form: round((t - totals[reference]) / 1e3, 3) for form, t in totals.items()}
        print(json.dumps({key: rows[key] for key in ("flux_dev_ms", "ratio", "lora_extra_ms")}, indent=1))
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
