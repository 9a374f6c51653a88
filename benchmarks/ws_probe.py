"""Where the warp-specialized narrow tiles go wrong (session 10: NaN in column 0 on an H200): the
fused GEMM with ws on and off over fp8/bf16 × bias × LoRA, on Flux's 512-token text-stream shape;
prints NaN counts, the columns and rows they sit in, and the largest difference elsewhere."""

import json
import os
import sys
from pathlib import Path

import torch
import triton
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loraplug as lp  # noqa: E402
from loraplug.runtime import kernels  # noqa: E402

os.environ["LORAPLUG_KERNELS"] = "all"
res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}


def layer(fp8: bool, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(3072, 9216, bias=bias, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    nn.init.normal_(lin.weight, std=0.05)
    model = nn.Sequential(lin)
    if fp8:
        lp.quantize_fp8(model)
    return model


def run(fp8, bias, lora, ws, tokens):
    model = layer(fp8, bias)
    key = "fp8_narrow" if fp8 else "bf16_narrow"
    saved = kernels.CONFIGS[key]
    kernels.CONFIGS[key] = kernels.Tiles(*saved)._replace(flatten=not ws, ws=ws)
    try:
        handle = None
        if lora:
            g = torch.Generator().manual_seed(1)
            sd = {"0.lora_A.weight": torch.randn(16, 3072, generator=g) * 0.1,
                  "0.lora_B.weight": torch.randn(9216, 16, generator=g) * 0.1}  # fmt: skip
            handle = lp.apply(model, sd)
        x = torch.randn(
            tokens,
            3072,
            device="cuda",
            dtype=torch.bfloat16,
            generator=torch.Generator("cuda").manual_seed(2),
        )
        with torch.no_grad():
            y = model(x)
        if handle:
            handle.remove()
        return y
    finally:
        kernels.CONFIGS[key] = saved


for tokens in (512, 300):
    for fp8 in (True, False):
        for bias in (True, False):
            for lora in (True, False):
                if not lora and not fp8:
                    continue  # a bf16 layer without adapters never takes the kernel
                name = f"t{tokens}_{'fp8' if fp8 else 'bf16'}_{'bias' if bias else 'nobias'}_{'lora' if lora else 'base'}"
                try:
                    ref, got = run(fp8, bias, lora, False, tokens), run(fp8, bias, lora, True, tokens)
                    nan = torch.isnan(got)
                    ok = ~nan & ~torch.isnan(ref)
                    res[name] = {
                        "nan": int(nan.sum()),
                        "nan_cols": sorted(set(nan.nonzero()[:, 1].tolist()))[:10],
                        "nan_rows": len(set(nan.nonzero()[:, 0].tolist())),
                        "ref_nan": int(torch.isnan(ref).sum()),
                        "max_diff_elsewhere": float((got[ok].float() - ref[ok].float()).abs().max()),
                        "ref_max": float(ref[ok].float().abs().max()),
                    }
                except Exception as e:  # noqa: BLE001 - a probe: record and go on
                    res[name] = repr(e)[:300]
                print(name, res[name], flush=True)
(Path(os.environ.get("OUT", ".")) / "ws_probe.json").write_text(json.dumps(res, indent=1))
