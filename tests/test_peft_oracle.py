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
