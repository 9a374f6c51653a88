"""The adapter family (LoHa, LoKr, OFT, BOFT, GLoRA, (IA)^3, full/diff, bias, DoRA on LoHa/LoKr)
against LyCORIS: files written by create_lycoris + save_weights load with lp.load, and
bypass == merge == LyCORIS' own forward for every layer kind and strength."""

import copy

import pytest
import torch
from conftest import assert_identical, close, snapshot
from hypothesis import assume, given
from hypothesis import strategies as st
from lycoris import create_lycoris
from torch import nn

import loraplug as lp
from loraplug import specs
from loraplug.arch import ModelIndex

STRENGTHS = (0.0, 0.5, 1.0, 1.7)


class Net(nn.Module):
    def __init__(self, lin=(64, 32), conv=(16, 32, 3), conv1d=(8, 16, 3)):
        super().__init__()
        self.lin = nn.Linear(*lin)
        self.conv = nn.Conv2d(*conv, stride=1, padding=1)
        self.conv1d = nn.Conv1d(*conv1d, stride=2, padding=1, dilation=2)

    def forward(self, x, img, seq):
        return torch.cat([self.lin(x).flatten(), self.conv(img).flatten(), self.conv1d(seq).flatten()])


def _inputs(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(3, net.lin.in_features, generator=g),
        torch.randn(2, net.conv.in_channels, 6, 6, generator=g),
        torch.randn(2, net.conv1d.in_channels, 13, generator=g),
    )


def _randomize(network, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "oft_blocks" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "rescale" in name or "dora_scale" in name:
                p.copy_(1 + torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lycoris_reference(tmp_path, base, algo, strength=1.0, seed=0, **kwargs):
    """(LyCORIS-adapted copy of base, path of the file it saved)."""
    model = copy.deepcopy(base)
    kwargs = {"linear_dim": 4, "linear_alpha": 2, **kwargs}
    network = create_lycoris(model, strength, algo=algo, **kwargs)
    network.apply_to()
    _randomize(network, seed)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return model, path


CASES = {
    "loha": ("loha", {}, Net()),
    "loha-tucker": ("loha", {"use_tucker": True}, Net()),
    "loha-dora": ("loha", {"dora_wd": True}, Net()),
    "lokr": ("lokr", {"factor": 4}, Net()),
    "lokr-full": ("lokr", {"full_matrix": True}, Net()),
    "lokr-decomposed-tucker": (
        "lokr",
        {"decompose_both": True, "factor": 16, "linear_dim": 2, "use_tucker": True},
        Net((256, 128), (64, 64, 3), (32, 32, 3)),
    ),
    "lokr-dora-in": ("lokr", {"factor": 4, "dora_wd": True, "wd_on_output": False}, Net()),
    "oft": ("diag-oft", {}, Net()),
    "oft-constrained-rescaled": ("diag-oft", {"constraint": 1e-3, "rescaled": True}, Net()),
    "boft": ("boft", {}, Net()),
    "boft-constrained-rescaled": ("boft", {"constraint": 1e-3, "rescaled": True}, Net()),
    "glora": ("glora", {}, Net()),
    "ia3": ("ia3", {}, Net()),
    "full": ("full", {}, Net()),
}
# Where loraplug's strength semantics are linear in s and LyCORIS' are not, only s = 1 is shared.
ONLY_FULL_STRENGTH = {"loha-dora", "lokr-dora-in", "oft-constrained-rescaled", "boft-constrained-rescaled"}
EXPECTED_KEYS = {
    "loha-tucker": "hada_t1",
    "lokr-decomposed-tucker": "lokr_t2",
    "lokr-full": "lokr_w2",
    "oft-constrained-rescaled": "rescale",
    "full": "diff_b",
}


def check_against_lycoris(tmp_path, case, strength, mode):
    algo, kwargs, base = CASES[case]
    torch.manual_seed(0)
    base = copy.deepcopy(base)
    reference, path = lycoris_reference(tmp_path, base, algo, strength=strength, **kwargs)
    inputs = _inputs(base)
    with torch.no_grad():
        want = reference(*inputs)
        plain = base(*inputs)
    adapters = lp.load(path)
    assert len(adapters) == 3 and not adapters.unknown_keys
    if case in EXPECTED_KEYS:
        assert any(EXPECTED_KEYS[case] in a.tensors for a in adapters.adapters.values())
    snap = snapshot(base)
    with lp.apply(base, adapters, strength=strength, mode=mode) as handle:
        assert handle.report.ok and len(handle.report.matched) == 3
        with torch.no_grad():
            got = base(*inputs)
    assert_identical(base, snap)
    close(got, want, rtol=1e-5, atol=2e-5)
    if strength != 0:
        assert not torch.allclose(want, plain, atol=1e-4), "the reference adapter does nothing"


@pytest.mark.parametrize("mode", ["bypass", "merge"])
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_lycoris(tmp_path, case, strength, mode):
    if case in ONLY_FULL_STRENGTH and strength not in (1.0,):
        pytest.skip("strength semantics differ from LyCORIS by design (see README)")
    check_against_lycoris(tmp_path, case, strength, mode)


@pytest.mark.parametrize("case", sorted(ONLY_FULL_STRENGTH))
def test_linear_strength_semantics_where_lycoris_differs(tmp_path, case):
    """W'(s) = W + s·(W'(1) − W): s = 0 is the base, s = 0.5 half way."""
    algo, kwargs, base = CASES[case]
    base = copy.deepcopy(base)
    _, path = lycoris_reference(tmp_path, base, algo, **kwargs)
    inputs = _inputs(base)
    with torch.no_grad():
        plain = base(*inputs)
        with lp.apply(base, path, strength=1.0):
            full = base(*inputs)
        for mode in ("bypass", "merge"):
            with lp.apply(base, path, strength=0.0, mode=mode):
                close(base(*inputs), plain)
            if algo in ("loha", "lokr"):  # DoRA is linear in s by construction
                with lp.apply(base, path, strength=0.5, mode=mode):
                    close(base(*inputs), (plain + full) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_a_zero_bypass_is_caught(tmp_path, case, monkeypatch):
    """The oracle test above fails when an algorithm's bypass path is replaced by zeros."""
    algo, kwargs, base = CASES[case]
    adapters = lp.load(lycoris_reference(tmp_path, copy.deepcopy(base), algo, **kwargs)[1])
    index = ModelIndex(base)
    key, adapter = next(iter(adapters.adapters.items()))
    op = index.ops[index.lookup(key)[0][0].module]
    patch = specs.get(adapter.algorithm).build(adapter, op, op.out_features)
    monkeypatch.setattr(type(patch), "bypass", lambda self, x, base, s: torch.zeros((), dtype=x.dtype))
    with pytest.raises(AssertionError):
        check_against_lycoris(tmp_path, case, 1.0, "bypass")


def test_ia3_on_input_matches_lycoris_module():
    from lycoris.modules.ia3 import IA3Module

    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    module = IA3Module("lycoris_lin", copy.deepcopy(layer), train_on_input=True)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape))
    module.apply_to()
    sd = {f"lin.{k}": v for k, v in module.state_dict().items() if k in ("weight", "on_input")}
    assert sd["lin.on_input"].item() == 1
    model = nn.Module()
    model.lin = layer
    x = torch.randn(4, 12)
    with torch.no_grad():
        want = module(x)
    for mode in ("bypass", "merge"):
        with lp.apply(model, sd, mode=mode):
            close(layer(x), want)


def test_bias_only_diff_and_missing_bias():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    x = torch.randn(5, 4)
    plain = model[0](x)
    diff_b = torch.tensor([1.0, -2.0, 0.5])
    for mode in ("bypass", "merge"):
        with lp.apply(model, {"0.diff_b": diff_b}, strength=0.5, mode=mode):
            close(model[0](x), plain + 0.5 * diff_b)
    with pytest.raises(lp.UnsupportedModuleError, match="bias"):
        lp.merge(model, {"1.diff_b": torch.ones(2)})
    with lp.apply(model, {"1.diff_b": torch.ones(2)}):
        close(model[1](torch.zeros(1, 3)), torch.ones(1, 2))


@given(
    algo=st.sampled_from(["loha", "lokr", "diag-oft", "boft", "glora", "ia3", "full"]),
    out_dim=st.sampled_from([8, 16, 24, 32]),
    in_dim=st.sampled_from([4, 8, 12, 16]),
    conv=st.booleans(),
    rank=st.integers(1, 4),
    strength=st.sampled_from(STRENGTHS),
)
def test_property_random_shapes(tmp_path_factory, algo, out_dim, in_dim, conv, rank, strength):
    torch.manual_seed(out_dim * 100 + in_dim)
    layer = nn.Conv2d(in_dim, out_dim, 3, padding=1) if conv else nn.Linear(in_dim, out_dim)
    model = nn.Module()
    model.layer = layer
    ref = copy.deepcopy(model)
    try:
        network = create_lycoris(ref, strength, linear_dim=rank, linear_alpha=1.0, algo=algo, factor=4)
        network.apply_to()
    except (ValueError, AssertionError, RuntimeError):
        assume(False)
    assume(len(network.loras) == 1)
    _randomize(network, rank)
    path = tmp_path_factory.mktemp("h") / "a.safetensors"
    network.save_weights(str(path), torch.float32, {})
    x = torch.randn(2, in_dim, 5, 5) if conv else torch.randn(3, in_dim)
    with torch.no_grad():
        want = ref.layer(x)
        for mode in ("bypass", "merge"):
            with lp.apply(model, path, strength=strength, mode=mode):
                close(layer(x), want, rtol=1e-5, atol=2e-5)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.conv = nn.Conv2d(16, 8, 1)
        self.gn = nn.GroupNorm(4, 8)

    def forward(self, x):
        h = self.ln(self.lin(x))
        return self.gn(self.conv(h[..., None, None].expand(-1, -1, 3, 3).contiguous()))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_norm_diffs_match_lycoris(tmp_path, strength):
    torch.manual_seed(0)
    base = Normed()
    reference, path = lycoris_reference(tmp_path, base, "lora", strength=strength, train_norm=True)
    adapters = lp.load(path)
    assert adapters.algorithms.get("norm") == 2
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = reference(x)
        for mode in ("bypass", "merge"):
            with lp.apply(base, adapters, strength=strength, mode=mode):
                close(base(x), want, rtol=1e-5, atol=2e-5)


def test_full_diffs_of_norm_layers_move_their_affine_weights():
    """``.diff`` / ``.diff_b`` on norm layers (ComfyUI and Wan LoRAs carry them): the same as
    adding them to the norm's weight and bias, at any strength, in bypass and merge."""
    torch.manual_seed(0)
    base = Normed()
    diffs = {"ln.diff": torch.randn(16), "ln.diff_b": torch.randn(16), "gn.diff": torch.randn(8)}
    reference = copy.deepcopy(base)
    x = torch.randn(4, 8)
    snap = snapshot(base)
    for strength in (0.5, 1.0):
        with torch.no_grad():
            reference.load_state_dict(base.state_dict())
            reference.ln.weight += strength * diffs["ln.diff"]
            reference.ln.bias += strength * diffs["ln.diff_b"]
            reference.gn.weight += strength * diffs["gn.diff"]
            want = reference(x)
        for mode in ("bypass", "merge"):
            with lp.apply(base, diffs, strength=strength, mode=mode) as handle:
                assert set(handle.report.matched) == {"ln", "gn"}
                with torch.no_grad():
                    close(base(x), want, rtol=1e-5, atol=2e-5)
    assert_identical(base, snap)


def test_lora_on_a_norm_layer_is_refused():
    model = Normed()
    with pytest.raises(lp.UnsupportedModuleError, match="norm layer"):
        lp.apply(model, {"ln.lora_A.weight": torch.randn(2, 16), "ln.lora_B.weight": torch.randn(16, 2)})


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(16, 32)


class Fused(nn.Module):
    def __init__(self, split):
        super().__init__()
        self.to_q, self.to_k, self.to_v = split.to_q, split.to_k, split.to_v  # kept, unused
        self.to_qkv = nn.Linear(16, 96)
        with torch.no_grad():
            self.to_qkv.weight.copy_(torch.cat([split.to_q.weight, split.to_k.weight, split.to_v.weight]))
            self.to_qkv.bias.copy_(torch.cat([split.to_q.bias, split.to_k.bias, split.to_v.bias]))
        self.fused_projections = True


@pytest.mark.parametrize(
    "algo, kwargs",
    [
        ("lora", {"dora_wd": True}),
        ("loha", {}),
        ("lokr", {"factor": 4}),
        ("diag-oft", {}),
        ("boft", {}),
        ("glora", {}),
        ("ia3", {}),
        ("full", {}),
    ],
)
def test_every_algorithm_writes_only_its_slice_of_a_fused_module(tmp_path, algo, kwargs):
    """An adapter trained on split to_k acts on rows 32:64 of the fused to_qkv, nowhere else."""
    torch.manual_seed(0)
    split = Split()
    network = create_lycoris(copy.deepcopy(split), 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kwargs)
    network.apply_to()
    _randomize(network, 3)
    sd = {k: v for k, v in network.state_dict().items() if k.startswith("lycoris_to_k.")}
    ref_k = network.loras[[lo.lora_name for lo in network.loras].index("lycoris_to_k")]
    fused = Fused(copy.deepcopy(split))
    x = torch.randn(5, 16)
    with torch.no_grad():
        want_k = ref_k(x)
        plain = fused.to_qkv(x)
        for mode in ("bypass", "merge"):
            with lp.apply(fused, sd, mode=mode) as handle:
                assert [str(t) for t in handle.report.matched["lycoris_to_k"]] == ["to_qkv[32:64]"]
                got = fused.to_qkv(x)
            close(got[:, 32:64], want_k, rtol=1e-5, atol=2e-5)
            assert torch.equal(got[:, :32], plain[:, :32]) and torch.equal(got[:, 64:], plain[:, 64:])
            assert not torch.allclose(got[:, 32:64], plain[:, 32:64], atol=1e-4)
