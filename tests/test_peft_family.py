"""LoHa, LoKr, (IA)^3 and OFT saved by PEFT (save_pretrained) reproduce PEFT's forward."""

import copy

import pytest
import torch
from conftest import assert_identical, close, snapshot
from peft import IA3Config, LoHaConfig, LoKrConfig, OFTConfig, get_peft_model
from torch import nn

import loraplug as lp


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 32)
        self.ff = nn.Linear(32, 24)
        self.conv = nn.Conv2d(8, 32, 3, padding=1)

    def forward(self, x, img):
        return torch.cat([self.ff(self.lin(x)).flatten(), self.conv(img).flatten()])


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("hada_", "lokr_", "ia3_l", "oft_R")):
                p.copy_(
                    torch.randn(p.shape, generator=g) * (0.05 if "oft_R" in name else 0.3)
                    + (1 if "ia3" in name else 0)
                )


CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=2, target_modules=["lin", "ff", "conv"]),
    "loha-rank-pattern": lambda: LoHaConfig(
        r=4, alpha=3, target_modules=["lin", "ff", "conv"], rank_pattern={"ff": 2}, alpha_pattern={"ff": 5}
    ),
    "lokr": lambda: LoKrConfig(r=4, alpha=2, target_modules=["lin", "ff", "conv"]),
    "lokr-decomposed": lambda: LoKrConfig(
        r=2, alpha=3, target_modules=["lin", "ff"], decompose_both=True, decompose_factor=4
    ),
    "ia3": lambda: IA3Config(target_modules=["lin", "ff", "conv"], feedforward_modules=["ff", "conv"]),
    "oft": lambda: OFTConfig(r=0, oft_block_size=4, target_modules=["lin", "ff"]),
    "oft-exact-coft": lambda: OFTConfig(
        r=0, oft_block_size=8, target_modules=["lin", "ff"], use_cayley_neumann=False, coft=True, eps=1e-2
    ),
    "oft-shared": lambda: OFTConfig(r=0, oft_block_size=4, target_modules=["lin"], block_share=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_saved_adapter_matches_peft(tmp_path, name):
    torch.manual_seed(0)
    base = Net()
    peft_model = get_peft_model(copy.deepcopy(base), CONFIGS[name]())
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    x, img = torch.randn(3, 16), torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        want = peft_model(x, img)
        plain = base(x, img)
    assert not torch.allclose(want, plain, atol=1e-4)
    adapters = lp.load(tmp_path)
    snap = snapshot(base)
    for mode in ("bypass", "merge"):
        with lp.apply(base, adapters, mode=mode) as handle:
            assert handle.report.ok
            with torch.no_grad():
                got = base(x, img)
        close(got, want, rtol=1e-5, atol=2e-5)
        assert_identical(base, snap)


def test_peft_oft_on_a_convolution_is_refused_clearly(tmp_path):
    conv = nn.Sequential(nn.Conv2d(8, 8, 1))
    peft_model = get_peft_model(copy.deepcopy(conv), OFTConfig(r=0, oft_block_size=4, target_modules=["0"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(lp.ShapeMismatchError, match="convolutions"):
        lp.apply(conv, tmp_path)


@pytest.mark.parametrize("factor", [0, 1, 2])
def test_peft_boft_matches_peft(tmp_path, factor):
    from peft import BOFTConfig

    torch.manual_seed(0)
    base = Net()
    config = BOFTConfig(
        boft_block_size=4,
        boft_n_butterfly_factor=factor,
        target_modules=["lin", "ff", "conv"],
        init_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path)
    x, img = torch.randn(3, 16), torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        want = peft_model(x, img)
    assert not torch.allclose(want, base(x, img), atol=1e-4)
    for mode in ("bypass", "merge"):
        with lp.apply(base, tmp_path, mode=mode), torch.no_grad():
            close(base(x, img), want, rtol=1e-5, atol=2e-5)
