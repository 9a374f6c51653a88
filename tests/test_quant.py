"""Adapters on quantized bases (CPU backends): bypass = the quantized base's own output + the float
adapter, exactly; close to the dequantized float reference; remove() leaves the quantized tensors
untouched; DoRA reads a dequantized copy; merge requantizes in the same scheme or refuses clearly;
adapter tensors are never integer or fp8."""

import pytest
import torch
from conftest import close
from torch import nn

import loraplug as lp
from loraplug.runtime import bypass
from loraplug.testing import ScaledFP8Linear

IN, OUT = 64, 96


def _float_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, OUT), nn.GELU(), nn.Linear(OUT, IN))


def _torchao(config_name):
    def make(model):
        torchao = pytest.importorskip("torchao.quantization")
        torchao.quantize_(model, getattr(torchao, config_name)())
        return model

    return make


def _quanto(qtype):
    def make(model):
        quanto = pytest.importorskip("optimum.quanto")
        quanto.quantize(model, weights=getattr(quanto, qtype))
        quanto.freeze(model)
        return model

    return make


def _gguf(qtype):
    def make(model):
        gguf = pytest.importorskip("gguf")
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        for i in (0, 2):
            linear = model[i]
            layer = GGUFLinear(
                linear.in_features, linear.out_features, bias=True, compute_dtype=torch.float32
            )
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            data = gguf.quants.quantize(linear.weight.detach().numpy(), kind)
            layer.weight = GGUFParameter(torch.from_numpy(data), quant_type=kind)
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            model[i] = layer
        return model

    return make


def _scaled_fp8(model):
    for i in (0, 2):
        model[i] = ScaledFP8Linear.from_linear(model[i])
    return model


BACKENDS = {
    "torchao-int8-weight": (_torchao("Int8WeightOnlyConfig"), True),
    "torchao-int8-dynamic": (_torchao("Int8DynamicActivationInt8WeightConfig"), True),
    "torchao-fp8-weight": (_torchao("Float8WeightOnlyConfig"), True),
    "quanto-qint8": (_quanto("qint8"), True),
    "quanto-qfloat8": (_quanto("qfloat8"), True),
    "quanto-qint4": (_quanto("qint4"), False),
    "gguf-q8_0": (_gguf("Q8_0"), True),
    "gguf-q4_0": (_gguf("Q4_0"), True),
    "scaled-fp8": (_scaled_fp8, True),
}


def _lora(seed=0, rank=4, dora=False, out=OUT):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "0.lora_A.weight": torch.randn(rank, IN, generator=g) * 0.1,
        "0.lora_B.weight": torch.randn(out, rank, generator=g) * 0.1,
    }
    if dora:
        sd["0.lora_magnitude_vector"] = torch.rand(out, generator=g) + 0.5
    return sd


def _dequantized(model):
    """The float model with each quantized layer replaced by its dequantized weight."""
    from loraplug.runtime.quant import float_weight

    ref = _float_model()
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(float_weight(model[i], str(i)))
            ref[i].bias.copy_(model[i].bias.float())
    return ref


def _quantized_state(module):
    w = module.weight
    raw = [
        getattr(w, a)
        for a in ("qdata", "_data", "scale", "_scale")
        if isinstance(getattr(w, a, None), torch.Tensor)
    ]
    raw = raw or [w.data]
    return w, [t.clone() for t in raw] + (
        [module.scale_weight.clone()] if hasattr(module, "scale_weight") else []
    )


def _same_state(module, state):
    w, tensors = state
    now = _quantized_state(module)[1]
    return module.weight is w and all(
        torch.equal(
            a.view(torch.uint8) if a.element_size() == 1 else a,
            b.view(torch.uint8) if b.element_size() == 1 else b,
        )
        for a, b in zip(now, tensors, strict=True)
    )  # noqa: E501


def _quantized_case(backend: str) -> tuple:
    """(the model quantized by ``backend``, its dequantized float twin, the quantized layer's state)."""
    model = BACKENDS[backend][0](_float_model())
    return model, _dequantized(model), _quantized_state(model[0])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bypass_on_quantized_base(backend):
    model, reference, state = _quantized_case(backend)
    x = torch.randn(5, IN)
    sd = _lora()
    delta = sd["0.lora_B.weight"] @ sd["0.lora_A.weight"]
    with torch.no_grad():
        base_first = model[0](x)
        with lp.apply(model, sd) as handle:
            assert handle.report.ok
            got_first = model[0](x)
            got = model(x)
            for entry in bypass.runners(model[0]).entries:  # never int8/uint8/fp8 adapters
                tensors = [
                    *entry.patch.all_tensors().values(),
                    *[t for c in entry.patch._cache.values() for t in c.values()],
                ]
                assert all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)
        with lp.apply(reference, sd):
            want = reference(x)
    close(got_first, base_first + x @ delta.T, rtol=1e-5, atol=1e-5)  # exactly base + adapter
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # within the quantization's own error
    assert _same_state(model[0], state)


@pytest.mark.parametrize("backend", ["torchao-int8-weight", "quanto-qint8", "gguf-q8_0", "scaled-fp8"])
def test_dora_on_quantized_base_reads_a_dequantized_copy(backend):
    model, reference, _ = _quantized_case(backend)
    x = torch.randn(5, IN)
    sd = _lora(dora=True)
    with torch.no_grad():
        with lp.apply(model, sd) as handle:
            assert handle.report.dequantized == {"0"}
            got = model[0](x)
        with lp.apply(reference, sd):
            want = reference[0](x)
    close(got, want, rtol=1e-4, atol=1e-4)  # same dequantized weight on both sides


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_merge_on_quantized_base(backend):
    model, reference, state = _quantized_case(backend)
    can = BACKENDS[backend][1]
    x = torch.randn(5, IN)
    sd = _lora()
    if not can:
        with pytest.raises(lp.UnsupportedModuleError, match="bypass"):
            lp.merge(model, sd)
        assert _same_state(model[0], state)
        return
    with torch.no_grad():
        with lp.merge(model, sd):
            assert model[0].weight is not state[0]
            got = model[0](x)
        with lp.apply(reference, sd):
            want = reference[0](x)
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert _same_state(model[0], state)  # the very same quantized tensors are back


def test_fused_slices_of_a_quantized_module():
    quanto = pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    attn = nn.Module()
    attn.to_qkv = nn.Linear(IN, 3 * 16)
    attn.to_q, attn.to_k, attn.to_v = nn.Linear(IN, 16), nn.Linear(IN, 16), nn.Linear(IN, 16)
    attn.fused_projections = True
    quanto.quantize(attn, weights=quanto.qint8)
    quanto.freeze(attn)
    g = torch.Generator().manual_seed(1)
    sd = {f"{n}.{ab}": torch.randn(*((2, IN) if ab == "lora_A.weight" else (16, 2)), generator=g)
          for n in ("to_q", "to_v") for ab in ("lora_A.weight", "lora_B.weight")}  # fmt: skip
    x = torch.randn(3, IN)
    with torch.no_grad():
        base = attn.to_qkv(x)
        with lp.apply(attn, sd):
            got = attn.to_qkv(x)
    close(
        got[:, :16],
        base[:, :16] + x @ (sd["to_q.lora_B.weight"] @ sd["to_q.lora_A.weight"]).T,
        rtol=1e-5,
        atol=1e-5,
    )
    assert torch.equal(got[:, 16:32], base[:, 16:32])
    close(
        got[:, 32:],
        base[:, 32:] + x @ (sd["to_v.lora_B.weight"] @ sd["to_v.lora_A.weight"]).T,
        rtol=1e-5,
        atol=1e-5,
    )
