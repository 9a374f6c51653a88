"""LoRA / LoCon / Tucker / DoRA against LyCORIS: files saved by create_lycoris + save_weights, and
the pure functions of lycoris.functional.locon."""

import copy

import pytest
import torch
from conftest import assert_identical, close, randomize_, snapshot
from hypothesis import given
from hypothesis import strategies as st
from lycoris import create_lycoris
from lycoris.functional import locon
from torch import nn

import loraplug as lp
from loraplug.algorithms.lora import lora_bypass, lora_delta_weight
from loraplug.algorithms.op import layer_op


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 7)
        self.conv = nn.Conv2d(3, 5, 3, stride=1, padding=1)
        self.conv1d = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)

    def forward(self, x, img, seq):
        return self.lin(x), self.conv(img), self.conv1d(seq)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(2, 10, generator=g),
        torch.randn(2, 3, 6, 6, generator=g),
        torch.randn(2, 3, 11, generator=g),
    )


def _lycoris_file(tmp_path, base, multiplier=1.0, **kwargs):
    model = copy.deepcopy(base)
    net = create_lycoris(model, multiplier, linear_dim=4, linear_alpha=2, algo="lora", **kwargs)
    net.apply_to()
    randomize_(net, ("lora_", "dora_scale"), std=0.2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:
                p.mul_(0.0).add_(torch.rand(p.shape) + 0.5)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return model, path


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"use_tucker": True}, {"dora_wd": True}, {"dora_wd": True, "wd_on_output": False}],
    ids=["locon", "tucker", "dora-out", "dora-in"],
)
def test_lycoris_file_reproduces_lycoris_forward(tmp_path, kwargs):
    torch.manual_seed(0)
    base = Net()
    ref_model, path = _lycoris_file(tmp_path, base, **kwargs)
    inputs = _inputs()
    with torch.no_grad():
        want = ref_model(*inputs)
        plain = base(*inputs)
    adapters = lp.load(path)
    assert adapters.format == "kohya"
    assert set(adapters.algorithms) == {"lora"}
    if kwargs.get("use_tucker"):
        assert any("mid" in a.tensors for a in adapters.adapters.values())
    snap = snapshot(base)
    for mode in ("bypass", "merge"):
        with lp.apply(base, adapters, mode=mode) as handle:
            assert len(handle.report.matched) == 3 and handle.report.ok
            with torch.no_grad():
                got = base(*inputs)
            for g, w, p in zip(got, want, plain, strict=True):
                close(g, w, rtol=1e-5, atol=1e-5)
                assert not torch.allclose(g, p, atol=1e-4)
        assert_identical(base, snap)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0, 1.7])
def test_strength_matches_lycoris_multiplier(tmp_path, strength):
    torch.manual_seed(1)
    base = Net()
    ref_model, path = _lycoris_file(tmp_path, base, multiplier=strength)
    inputs = _inputs()
    with torch.no_grad():
        want = ref_model(*inputs)
    handle = lp.apply(base, path, strength=0.3)
    handle.set_strength(strength)
    with torch.no_grad():
        got = base(*inputs)
    for g, w in zip(got, want, strict=True):
        close(g, w, rtol=1e-5, atol=1e-5)
    handle.remove()


@given(
    rank=st.integers(1, 6),
    out_dim=st.integers(1, 9),
    in_dim=st.integers(1, 9),
    kernel=st.sampled_from([(), (1,), (3,), (3, 3), (1, 3), (2, 2, 2)]),
    tucker=st.booleans(),
    gamma=st.floats(0.1, 3.0),
)
def test_functions_match_lycoris_functional(rank, out_dim, in_dim, kernel, tucker, gamma):
    g = torch.Generator().manual_seed(rank * 31 + out_dim)
    tucker = tucker and bool(kernel)
    if tucker:
        down = torch.randn(rank, in_dim, *([1] * len(kernel)), generator=g)
        mid = torch.randn(rank, rank, *kernel, generator=g)
    else:
        down, mid = torch.randn(rank, in_dim, *kernel, generator=g), None
    up = torch.randn(out_dim, rank, *([1] * len(kernel)), generator=g)
    reference = locon.diff_weight(down, up, mid, gamma=gamma, backend="torch")
    # fp32 at 1e-5 of the tensor's scale (sums of hundreds of products: entries that cancel to
    # near zero carry the rounding of their large terms)
    close(
        lora_delta_weight(down, up, mid, gamma),
        reference,
        rtol=1e-5,
        atol=1e-5 * reference.abs().max().item(),
    )
    layer = (
        nn.Linear(in_dim, out_dim)
        if not kernel
        else getattr(nn, f"Conv{len(kernel)}d")(in_dim, out_dim, kernel, padding=1)
    )
    op = layer_op(layer)
    x = torch.randn(2, in_dim, *([5] * len(kernel)), generator=g)
    extra = {} if not kernel else {"padding": 1}
    want = locon.bypass_forward_diff(x, None, down, up, mid, gamma=gamma, extra_args=extra, backend="torch")
    close(
        lora_bypass(x, down, up, mid, gamma, op),
        want,
        rtol=1e-5,
        atol=1e-5 * max(1.0, want.abs().max().item()),
    )
