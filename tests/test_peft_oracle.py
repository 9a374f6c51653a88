"""LoRA / rsLoRA / DoRA against PEFT on Linear and Conv2d: bypass == merge == PEFT."""

import copy

import pytest
import torch
from conftest import assert_identical, close, randomize_, snapshot
from peft import LoraConfig, get_peft_model
from torch import nn

import loraplug as lp


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, 16, generator=g), torch.randn(2, 4, 9, 9, generator=g)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_equals_peft(tmp_path, use_rslora, use_dora):
    torch.manual_seed(0)
    base = Net()
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["lin", "conv"],
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize_(peft_model, ("lora_A", "lora_B", "lora_magnitude"), std=0.2)
    peft_model.save_pretrained(tmp_path)
    x, img = _inputs()
    with torch.no_grad():
        want = peft_model(x, img)
        plain = base(x, img)

    adapters = lp.load(tmp_path)
    assert adapters.format == "peft"
    assert adapters.algorithms == {"lora": 2}
    snap = snapshot(base)
    for mode in ("bypass", "merge"):
        handle = lp.apply(base, adapters, mode=mode)
        assert not handle.report.unmatched and len(handle.report.matched) == 2
        with torch.no_grad():
            got = base(x, img)
        close(got[0], want[0])
        close(got[1], want[1])
        assert not torch.allclose(got[0], plain[0], atol=1e-3), "adapter had no effect"
        handle.remove()
        assert_identical(base, snap)


def test_lora_bias_equals_peft(tmp_path):
    """PEFT's ``lora_bias=True`` (a bias on lora_B, as in BFL's Flux control LoRAs): bypass and merge
    equal PEFT, strength scales the bias with the weights, and the bias survives kohya and PEFT
    round trips; a bias on a DoRA adapter is refused with the key named."""
    torch.manual_seed(0)
    base = Net()
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], lora_bias=True, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize_(peft_model, ("lora_A", "lora_B"), std=0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    x, img = _inputs()
    with torch.no_grad():
        want, plain = peft_model(x, img)[0], base(x, img)[0]
    with torch.no_grad():
        peft_model.base_model.model.lin.lora_B["default"].bias.zero_()
        without_bias = peft_model(x, img)[0]
    assert not torch.allclose(want, without_bias, atol=1e-3), "the bias must matter to this test"

    adapters = lp.load(tmp_path / "peft")
    assert {a.source["up_bias"] for a in adapters.adapters.values()} == {"base_model.model.lin.lora_B.bias"}
    snap = snapshot(base)
    for mode in ("bypass", "merge"):
        handle = lp.apply(base, adapters, mode=mode)
        with torch.no_grad():
            close(base(x, img)[0], want)
            handle.set_strength(0.5)
            close(base(x, img)[0], plain + 0.5 * (want - plain))
        handle.remove()
        assert_identical(base, snap)
    for fmt in ("kohya", "peft"):
        lp.save(adapters, tmp_path / f"{fmt}.safetensors", format=fmt, model=base)
        again = lp.load(tmp_path / f"{fmt}.safetensors")
        with lp.apply(base, again):
            with torch.no_grad():
                close(base(x, img)[0], want)

    dora = {
        "lin.lora_A.weight": torch.randn(4, 16),
        "lin.lora_B.weight": torch.randn(12, 4),
        "lin.lora_B.bias": torch.randn(12),
        "lin.lora_magnitude_vector": torch.rand(12) + 1,
    }
    with pytest.raises(lp.LoraplugError, match="lin.*lora_B.bias"):
        lp.apply(base, dora)
    assert_identical(base, snap)
