"""The warp-specialized tiles against a float32 reference (sessions 9–10 saw NaN in column 0 of
every tile whenever the LoRA tail ran, with P stored N-major; session 15 with P K-major too), and
the cost of the tail by rank: the fused GEMM on Flux's fused q/k/v shape (3072 → 9216, a bias)
over fp8/bf16 × tokens (512: narrow tiles; 4608: full tiles) × no LoRA / one LoRA of rank 16, 8 or 4 on the whole output /
``4qkv``: rank 4 on each of the q, k, v slices (runs starting off the 16-byte grid)
(``RANKS`` picks), with ws on and off for the tiles that shape takes (``TILE_VARIANTS="flat ws"``). Per case: NaN count
and the columns they sit in, the relative error against float32 (x and the weight as the kernel
sees them, fp8 quantization included), and the layer's time under a CUDA graph (triton's
do_bench_cudagraph)."""

import json
import os
import sys
from pathlib import Path

import torch
import triton
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loraplug as lp  # noqa: E402
from loraplug import arch  # noqa: E402
from loraplug.fp8 import quantize_per_row  # noqa: E402
from loraplug.runtime import kernels  # noqa: E402

os.environ["LORAPLUG_KERNELS"] = "all"
K, N = 3072, 9216
res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}


QKV = {n: (i * K, K) for i, n in enumerate("qkv")}  # the layer's output slices, as Flux's fused projection


def _qkv_slices(model, ops):
    """Names q, k, v for the probe layer's slices ``QKV``."""
    found = {n: [arch.Target("0", off, size)] for n, (off, size) in QKV.items()} if isinstance(model, nn.Sequential) else {}  # fmt: skip
    return found, set()


def _as_run(t: torch.Tensor) -> torch.Tensor:
    """An adapter tensor as the kernel sees it (bf16 on the GPU), in float32 for the reference."""
    return t.to("cuda", torch.bfloat16).float()


arch.PROVIDERS.append(_qkv_slices)


def case(fp8: bool, lora: bool, tokens: int, rank: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The layer (with a bias; LoRA applied), an input, and the float32 reference output."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(K, N).requires_grad_(False)
    nn.init.normal_(lin.weight, std=0.05, generator=g)
    model = nn.Sequential(lin.to("cuda", torch.bfloat16))
    x = torch.randn(tokens, K, generator=g).to("cuda", torch.bfloat16)
    w = model[0].weight.float()
    xr = x.float()
    if fp8:
        lp.quantize_fp8(model)
        wq, ws = model[0].weight, model[0].weight_scale
        w = wq.float() * ws.float()[:, None]
        q, sx = quantize_per_row(x)
        xr = q.float() * sx.float()[:, None]
    ref = xr @ w.T + model[0].bias.float()
    if lora:
        r = int(rank.removesuffix("qkv"))
        names = QKV if rank.endswith("qkv") else {"0": (0, N)}
        sd = {}
        for name, (off, size) in names.items():
            down = torch.randn(r, K, generator=g) * 0.02
            ups = torch.randn(size, r, generator=g) * 0.1
            sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": ups}
            ref[:, off : off + size] += x.float() @ _as_run(down).T @ _as_run(ups).T
        assert lp.apply(model, sd).report.ok
    return model, x, ref


def measure(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> dict:
    with torch.no_grad():
        y = model(x).float()
        nan = torch.isnan(y)
        ok = ~nan
        rel = float((y[ok] - ref[ok]).norm() / ref[ok].norm())
        ms = triton.testing.do_bench_cudagraph(lambda: model(x), rep=50)
    return {
        "nan": int(nan.sum()),
        "nan_cols": sorted(set(nan.nonzero()[:, 1].tolist()))[:10],
        "rel_err": rel,
        "max_abs_err": float((y[ok] - ref[ok]).abs().max()),
        "us": ms * 1e3,
    }


sms = torch.cuda.get_device_properties(0).multi_processor_count
RANKS = os.environ.get("RANKS", "16 8 4 4qkv").split()
cases = [
    (tokens, fp8, lora, rank)
    for tokens in (512, 4608)
    for fp8 in (True, False)
    for lora in (True, False)
    for rank in (RANKS if lora else ("16",))
    if lora or fp8  # a bf16 layer without adapters never takes the kernel
]
TILE_FIELDS = {"flat": dict(flatten=True, ws=False), "ws": dict(flatten=False, ws=True)}
VARIANTS = {k: TILE_FIELDS[k] for k in os.environ.get("TILE_VARIANTS", "flat ws").split()}
for tokens, fp8, lora, rank in cases:
    model, x, ref = case(fp8, lora, tokens, rank)
    tiles = kernels.config_for(fp8, tokens, N, sms)
    key = ("fp8" if fp8 else "bf16") + ("_narrow" if tiles.bn < kernels.config(fp8).bn else "")
    name = f"t{tokens}_{key}_{f'r{rank}' if lora else 'base'}"
    saved = kernels.CONFIGS[key]
    for variant, fields in VARIANTS.items():
        label = f"{name}_{variant}"
        kernels.CONFIGS[key] = kernels.Tiles(*saved)._replace(**fields)
        try:
            res[label] = measure(model, x, ref)
        except Exception as e:  # noqa: BLE001 - a probe: record and go on
            res[label] = repr(e)[:300]
        finally:
            kernels.CONFIGS[key] = saved
        print(label, res[label], flush=True)
(Path(os.environ.get("OUT", ".")) / "ws_probe.json").write_text(json.dumps(res, indent=1))
