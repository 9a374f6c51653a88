"""GPU-only quantized backends (run on the device machine): bitsandbytes 8-bit and 4-bit (nf4, fp4)
and torchao's float8 dynamic-activation scheme, in bypass (== base + adapter), DoRA (reads a
dequantized copy), merge (refused clearly for bitsandbytes) and exact removal."""

import pytest
import torch
from torch import nn

import loraplug as lp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IN, OUT = 64, 96


def _float_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, OUT), nn.GELU(), nn.Linear(OUT, IN)).cuda().half()


def _bnb(kind):
    bnb = pytest.importorskip("bitsandbytes")
    model = _float_model()
    for i in (0, 2):
        old = model[i]
        if kind == "int8":
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(old.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                old.in_features, old.out_features, compute_dtype=torch.float16, quant_type=kind
            )
            new.weight = bnb.nn.Params4bit(old.weight.data.cpu(), requires_grad=False, quant_type=kind)
        new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        model[i] = new.cuda()
    return model


def _lora(dora=False):
    g = torch.Generator().manual_seed(0)
    sd = {
        "0.lora_A.weight": torch.randn(4, IN, generator=g) * 0.1,
        "0.lora_B.weight": torch.randn(OUT, 4, generator=g) * 0.1,
    }
    if dora:
        sd["0.lora_magnitude_vector"] = torch.rand(OUT, generator=g) + 0.5
    return sd


@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4"])
def test_bitsandbytes(kind):
    model = _bnb(kind)
    x = torch.randn(5, IN, device="cuda", dtype=torch.float16)
    sd = _lora()
    delta = (sd["0.lora_B.weight"] @ sd["0.lora_A.weight"]).cuda().half()
    weight_bytes = model[0].weight.data.clone()
    with torch.no_grad():
        base = model[0](x)
        with lp.apply(model, sd) as handle:
            assert handle.report.ok
            got = model[0](x)
        with lp.apply(model, _lora(dora=True)) as handle:
            assert handle.report.dequantized == {"0"}
            model(x)
    torch.testing.assert_close(got, base + x @ delta.T, rtol=2e-2, atol=2e-2)
    assert torch.equal(model[0].weight.data, weight_bytes)
    with pytest.raises(lp.UnsupportedModuleError, match="bypass"):
        lp.merge(model, sd)


def test_torchao_float8_dynamic():
    torchao = pytest.importorskip("torchao.quantization")
    model = _float_model().to(torch.bfloat16)
    torchao.quantize_(model, torchao.Float8DynamicActivationFloat8WeightConfig())
    x = torch.randn(5, IN, device="cuda", dtype=torch.bfloat16)
    sd = _lora()
    delta = (sd["0.lora_B.weight"] @ sd["0.lora_A.weight"]).cuda().to(torch.bfloat16)
    with torch.no_grad():
        base = model[0](x)
        with lp.apply(model, sd):
            got = model[0](x)
        with lp.merge(model, sd):
            merged = model[0](x)
    torch.testing.assert_close(got, base + x @ delta.T, rtol=2e-2, atol=2e-2)
    assert (merged - got).abs().max() < 0.1 * got.abs().max()
