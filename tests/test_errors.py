"""Bad input: a clear LoraplugError naming the key, and the model exactly as it was."""

import pickle

import pytest
import torch
from conftest import assert_identical, snapshot
from safetensors.torch import save_file
from torch import nn

import loraplug as lp


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))


def _good():
    return {
        "0.lora_A.weight": torch.randn(2, 8),
        "0.lora_B.weight": torch.randn(6, 2),
        "1.lora_A.weight": torch.randn(2, 6),
        "1.lora_B.weight": torch.randn(4, 2),
    }


def _untouched(model, snap):
    assert_identical(model, snap)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("mode", ["bypass", "merge"])
@pytest.mark.parametrize(
    "mutate, error, needle",
    [
        (lambda sd: sd.update({"1.lora_B.weight": torch.randn(5, 2)}), lp.ShapeMismatchError, "1"),
        (lambda sd: sd.update({"1.lora_A.weight": torch.randn(2, 7)}), lp.ShapeMismatchError, "down"),
        (lambda sd: sd.pop("1.lora_A.weight"), lp.AdapterTensorError, "1.lora_B.weight"),
        (lambda sd: sd["1.lora_B.weight"].__setitem__((0, 0), float("nan")), lp.AdapterTensorError, "NaN"),
        (
            lambda sd: sd["1.lora_A.weight"].__setitem__((0, 0), float("inf")),
            lp.AdapterTensorError,
            "1.lora_A",
        ),
        (
            lambda sd: sd.update({"1.lora_B.weight": torch.ones(4, 2, dtype=torch.int8)}),
            lp.AdapterTensorError,
            "int8",
        ),
        (
            lambda sd: sd.update(
                {"2.lora_A.weight": torch.randn(2, 4), "2.lora_B.weight": torch.randn(4, 2)}
            ),
            lp.UnmatchedKeysError,
            "'2'",
        ),
        (
            lambda sd: sd.update({"1.hypernet.weight": torch.randn(3)}),
            lp.UnmatchedKeysError,
            "1.hypernet.weight",
        ),
        (lambda sd: sd.update({"1.lora_B.bias": torch.randn(5)}), lp.ShapeMismatchError, "1: up_bias"),
    ],
    ids=[
        "up-rows",
        "down-cols",
        "missing-down",
        "nan",
        "inf",
        "int8",
        "unknown-module",
        "unknown-tensor",
        "up-bias",
    ],
)
def test_bad_adapter_raises_and_leaves_model_untouched(mode, mutate, error, needle):
    model = _model()
    snap = snapshot(model)
    sd = _good()
    mutate(sd)
    with pytest.raises(error) as info:
        lp.apply(model, sd, mode=mode)
    assert needle in str(info.value)
    assert isinstance(info.value, lp.LoraplugError)
    _untouched(model, snap)


def test_strict_false_applies_matched_and_reports_the_rest():
    model = _model()
    sd = _good()
    sd.update({"9.lora_A.weight": torch.randn(2, 4), "9.lora_B.weight": torch.randn(4, 2)})
    handle = lp.apply(model, sd, strict=False)
    assert set(handle.report.matched) == {"0", "1"}
    assert list(handle.report.unmatched) == ["9"]
    assert "unmatched keys" in str(handle.report)
    handle.remove()


def test_second_adapter_set_failing_rolls_back_the_first():
    model = _model()
    snap = snapshot(model)
    bad = _good()
    bad["1.lora_B.weight"] = torch.randn(3, 2)
    with pytest.raises(lp.ShapeMismatchError):
        lp.apply(model, [_good(), bad])
    _untouched(model, snap)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(_good(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(lp.AdapterFileError, match="truncated"):
        lp.load(path)
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(lp.AdapterFileError):
        lp.load(path)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(lp.AdapterFileError, match="no such file"):
        lp.load(tmp_path / "nope.safetensors")
    with pytest.raises(lp.AdapterFileError, match="adapter_model"):
        lp.load(tmp_path)


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"0.lora_A.weight": _Boom()}))
    with pytest.raises(lp.AdapterFileError, match="never unpickles"):
        lp.load(path)
    assert "pwned" not in capsys.readouterr().out
    good = tmp_path / "good.pt"
    torch.save({"state_dict": _good()}, good)
    assert lp.load(good).algorithms == {"lora": 2}


def test_unknown_format_lists_keys_and_formats():
    with pytest.raises(lp.FormatError) as info:
        lp.load({"model.layer.weight": torch.randn(2, 2), "foo": torch.randn(1)})
    message = str(info.value)
    assert "model.layer.weight" in message and "kohya" in message and "peft" in message


def test_merge_into_integer_weight_is_refused_before_anything_changes():
    model = _model()
    model[1].weight = nn.Parameter(torch.ones(4, 6, dtype=torch.int8), requires_grad=False)
    snap = snapshot(model)
    with pytest.raises(lp.UnsupportedModuleError, match="bypass"):
        lp.merge(model, _good())
    _untouched(model, snap)


def test_bad_strength_and_mode():
    model = _model()
    with pytest.raises(lp.LoraplugError, match="mode"):
        lp.apply(model, _good(), mode="fuse")
    with pytest.raises(lp.HandleError, match="strengths"):
        lp.apply(model, [_good(), _good()], strength=[1.0])
    assert all(not m._forward_hooks for m in model.modules())


def test_two_peft_adapter_names_in_one_state_dict():
    sd = {
        "lin.lora_A.default.weight": torch.randn(2, 4),
        "lin.lora_A.other.weight": torch.randn(2, 4),
        "lin.lora_B.default.weight": torch.randn(4, 2),
    }
    with pytest.raises(lp.FormatError, match="two adapters"):
        lp.load(sd)


@pytest.mark.parametrize("width, hinted", [(2, True), (0.5, False)])
def test_a_flux_control_lora_is_named_as_such(width, hinted):
    """A Flux Control LoRA (Canny/Depth) reads twice the image-input channels: the shape error says
    what the file is and where it loads; a plain mismatch on that layer gets no such hint; the model
    is untouched either way."""
    from loraplug.testing import tiny_flux

    model = tiny_flux()
    snap = snapshot(model)
    inner, dim = model.x_embedder.in_features, model.x_embedder.out_features
    g = torch.Generator().manual_seed(0)
    sd = {
        "img_in.lora_A.weight": torch.randn(4, int(inner * width), generator=g),
        "img_in.lora_B.weight": torch.randn(dim, 4, generator=g),
        "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, dim, generator=g),
        "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * dim, 4, generator=g),
    }
    with pytest.raises(lp.ShapeMismatchError, match="x_embedder|img_in") as err:
        lp.apply(model, sd)
    assert ("Flux Control LoRA" in str(err.value)) == hinted
    _untouched(model, snap)


@pytest.mark.parametrize(
    "name", ["LORAPLUG_KERNELS", "LORAPLUG_ACCUMULATE", "LORAPLUG_TRAIN_GEMM", "LORAPLUG_TRAIN_KERNELS"]
)
def test_an_unknown_switch_value_is_named(name, monkeypatch):
    """A mistyped environment switch is an error naming it and its values, not silently the
    default: at apply, before the model is touched, and where a forward reads it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    before = snapshot(model)
    monkeypatch.setenv(name, "yes")
    needle = f"{name}='yes' is not a setting; use one of"
    with pytest.raises(lp.LoraplugError, match=needle):
        lp.create(model, "lora", rank=2, targets=["^0$"], init="random")
    assert_identical(model, before)
    monkeypatch.delenv(name)
    handle = lp.create(model, "lora", rank=2, targets=["^0$"], init="random")
    if name in ("LORAPLUG_ACCUMULATE", "LORAPLUG_TRAIN_GEMM"):  # the others are read on CUDA only
        monkeypatch.setenv(name, "yes")
        with pytest.raises(lp.LoraplugError, match=needle):
            model(torch.randn(3, 8)).sum().backward()
        monkeypatch.delenv(name)
    model(torch.randn(3, 8)).sum().backward()
    handle.remove()
