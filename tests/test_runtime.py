"""Bypass and merge runtimes: fused slices, stacking, strength, enable/disable, exact removal."""

import copy
import gc
import tracemalloc

import pytest
import torch
from conftest import assert_identical, close, snapshot
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import loraplug as lp
from loraplug import specs
from loraplug.runtime import bypass


class Attn(nn.Module):
    """diffusers-style attention after fuse_qkv_projections(): split q/k/v kept, fused to_qkv used."""

    def __init__(self, dim=8, kv_dim=6):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, kv_dim), nn.Linear(dim, kv_dim)
        self.to_qkv = nn.Linear(dim, dim + 2 * kv_dim)
        with torch.no_grad():
            self.to_qkv.weight.copy_(torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
            self.to_qkv.bias.copy_(torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias]))
        self.fused_projections = True

    def split(self, x):
        return torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], -1)


def _lora_sd(names, dims, in_dim=8, rank=3, seed=0, prefix="transformer.blocks.0.attn."):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, out in zip(names, dims, strict=True):
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return sd


def test_three_loras_on_a_fused_qkv_linear_equal_peft_on_split():
    """The fused-projection case: [Wq; Wk; Wv] in one Linear, one LoRA per slice, vs PEFT on split."""
    torch.manual_seed(0)
    attn = Attn()
    sd = _lora_sd(["to_q", "to_k", "to_v"], [8, 6, 6], prefix="base_model.model.")
    peft = get_peft_model(
        copy.deepcopy(attn), LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "to_k", "to_v"])
    )
    missing = peft.load_state_dict(
        {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, strict=False
    )
    assert not [k for k in missing.missing_keys if "lora" in k]
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        want = peft.base_model.model.split(x)
        plain = attn.to_qkv(x)
    snap = snapshot(attn)
    for mode in ("bypass", "merge"):
        handle = lp.apply(attn, sd, mode=mode)
        assert {str(t[0]) for t in handle.report.matched.values()} == {
            "to_qkv[0:8]",
            "to_qkv[8:14]",
            "to_qkv[14:20]",
        }
        with torch.no_grad():
            got = attn.to_qkv(x)
        close(got, want)
        for lo, hi in ((0, 8), (8, 14), (14, 20)):  # every slice moved
            assert not torch.allclose(got[..., lo:hi], plain[..., lo:hi], atol=1e-3)
        handle.remove()
        assert_identical(attn, snap)


def test_stacked_handles_strength_enable_disable():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 20))
    a = {"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(20, 2)}
    b = {
        "0.lora_down.weight": torch.randn(3, 8),
        "0.lora_up.weight": torch.randn(20, 3),
        "0.alpha": torch.tensor(1.5),
    }
    x = torch.randn(3, 8)
    w0 = layer[0].weight.detach().clone()
    delta_a = a["0.lora_B.weight"] @ a["0.lora_A.weight"]
    delta_b = b["0.lora_up.weight"] @ b["0.lora_down.weight"] * 0.5

    def expect(sa, sb):
        return x @ (w0 + sa * delta_a + sb * delta_b).T + layer[0].bias.detach()

    ha = lp.apply(layer, a, strength=0.5)
    hb = lp.apply(layer, b, strength=2.0)
    assert len(bypass.runners(layer[0]).entries) == 2  # one hook, both adapters
    close(layer(x), expect(0.5, 2.0), rtol=1e-5, atol=1e-5)
    ha.set_strength(1.7)
    close(layer(x), expect(1.7, 2.0), rtol=1e-5, atol=1e-5)
    hb.disable()
    close(layer(x), expect(1.7, 0.0), rtol=1e-5, atol=1e-5)
    hb.enable()
    close(layer(x), expect(1.7, 2.0), rtol=1e-5, atol=1e-5)
    hm = lp.merge(layer, [a, b], strength=[1.0, -1.0])
    close(layer(x), expect(2.7, 1.0), rtol=1e-5, atol=1e-5)
    hm.set_strength([0.0, 0.0])
    assert torch.equal(layer[0].weight, w0)
    ha.remove()
    hb.remove()
    hm.remove()
    assert bypass.runners(layer[0]) is None
    assert not layer[0]._forward_hooks
    assert torch.equal(layer[0].weight, w0)
    with pytest.raises(lp.HandleError):
        ha.set_strength(1.0)


class _Ops(TorchDispatchMode):
    """The ATen operators a call runs, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_inference_scales_each_run_in_its_up_gemm():
    """Eager inference gives each run's scale·strength to its addmm_ as alpha where the run's
    entries share one (here q+k at one strength, v at another): no pass over the hidden activation
    to scale it. A strength change reaches the alphas; two adapters with different strengths on one
    slice scale the hidden activation per rank instead. The output is the reference throughout."""
    torch.manual_seed(0)
    attn = Attn()
    qk = _lora_sd(["to_q", "to_k"], [8, 6], prefix="base_model.model.")
    v = _lora_sd(["to_v"], [6], seed=1, prefix="base_model.model.")
    q2 = _lora_sd(["to_q"], [8], seed=2, prefix="base_model.model.")
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        plain = attn.to_qkv(x)

    def delta(sd, name, strength):
        pre = f"base_model.model.{name}."
        return strength * (x @ sd[pre + "lora_A.weight"].T) @ sd[pre + "lora_B.weight"].T

    def want(s_qk, s_v, s_q2=0.0):
        with torch.no_grad():
            q = delta(qk, "to_q", s_qk) + delta(q2, "to_q", s_q2) if s_q2 else delta(qk, "to_q", s_qk)
            return plain + torch.cat([q, delta(qk, "to_k", s_qk), delta(v, "to_v", s_v)], -1)

    def run():
        with torch.no_grad(), _Ops() as ops:
            return attn.to_qkv(x), ops.names

    h_qk, h_v = lp.apply(attn, qk, strength=0.5), lp.apply(attn, v, strength=2.0)
    got, names = run()
    group = next(iter(bypass.runners(attn.to_qkv)._lowrank.values()))
    assert group.run_alphas == [0.5, 0.5, 2.0]
    assert not [n for n in names if n.startswith("aten.mul")] and sum("addmm_" in n for n in names) == 3
    close(got, want(0.5, 2.0), rtol=1e-5, atol=1e-5)
    h_v.set_strength(-1.25)
    got, _ = run()
    assert group.run_alphas == [0.5, 0.5, -1.25]
    close(got, want(0.5, -1.25), rtol=1e-5, atol=1e-5)
    tracked = attn.to_qkv(x)  # the base's weight takes gradients: the slices are written under autograd
    close(tracked.detach(), want(0.5, -1.25), rtol=1e-5, atol=1e-5)
    tracked.square().sum().backward()
    close(
        attn.to_qkv.weight.grad,
        2 * want(0.5, -1.25).reshape(-1, 20).T @ x.reshape(-1, 8),
        rtol=1e-5,
        atol=1e-4,
    )
    h_v.disable()
    got, _ = run()
    assert group.run_alphas == [0.5, 0.5, 0.0]
    close(got, want(0.5, 0.0), rtol=1e-5, atol=1e-5)
    h_v.enable()
    h_q2 = lp.apply(attn, q2, strength=3.0)  # q's run: 0.5 and 3.0
    got, names = run()
    group = next(iter(bypass.runners(attn.to_qkv)._lowrank.values()))
    assert group.run_alphas is None and "aten.mul_.Tensor" in names
    close(got, want(0.5, -1.25, 3.0), rtol=1e-5, atol=1e-5)
    for h in (h_q2, h_v, h_qk):
        h.remove()


def test_merge_handles_removed_out_of_order_restore_exact_bytes():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 6).to(torch.bfloat16))
    snap = snapshot(layer)
    sds = [{"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(6, 2)} for _ in range(3)]
    handles = [lp.merge(layer, sd, strength=0.3 * (i + 1)) for i, sd in enumerate(sds)]
    handles[1].remove()
    handles[0].remove()
    handles[2].remove()
    assert_identical(layer, snap)


def test_conv_geometry_bypass_equals_merge():
    torch.manual_seed(0)
    for conv in (
        nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=2),
        nn.Conv2d(3, 4, (3, 1), stride=1, padding="same", padding_mode="reflect"),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"),
        nn.Conv3d(2, 3, 2, stride=1, padding=1),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
    ):
        model = nn.Sequential(conv)
        k = conv.kernel_size
        sd = {
            "0.lora_down.weight": torch.randn(2, conv.in_channels // conv.groups, *k),
            "0.lora_up.weight": torch.randn(conv.out_channels, 2, *([1] * len(k))),
        }
        x = torch.randn(2, conv.in_channels, *([7] * len(k)))
        plain = model(x)
        with lp.apply(model, sd, strength=0.8):
            by = model(x)
        with lp.merge(model, sd, strength=0.8):
            me = model(x)
        close(by, me, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(by, plain, atol=1e-3)


def test_apply_remove_200_times_does_not_grow_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    sd = {
        f"{i}.lora_{ab}.weight": torch.randn(4, 32) if ab == "A" else torch.randn(32, 4)
        for i in range(2)
        for ab in "AB"
    }
    adapters = lp.load(sd)
    snap = snapshot(model)
    x = torch.randn(2, 32)

    def cycle():
        for mode in ("bypass", "merge"):
            h = lp.apply(model, adapters, mode=mode)
            model(x)
            h.remove()

    for _ in range(5):
        cycle()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        cycle()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after - before < 64 * 1024, f"grew by {after - before} bytes"
    assert_identical(model, snap)
    assert all(not m._forward_hooks for m in model)


@given(
    in_dim=st.integers(1, 12),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    ranks=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    strength=st.sampled_from([0.0, 0.5, 1.0, 1.7, -0.3]),
)
def test_property_slices_bypass_equals_merge_and_reference(in_dim, sizes, ranks, dtype, strength):
    """Any fused layout: each adapter adds exactly into its slice, in any float dtype."""
    g = torch.Generator().manual_seed(sum(sizes) * 7 + in_dim)
    parts = [f"p{i}" for i in range(len(sizes))]
    rank = [ranks.draw(st.integers(1, 5)) for _ in sizes]

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fused = nn.Linear(in_dim, sum(sizes)).to(dtype)

    model = Fused()
    from loraplug.arch import ModelIndex, split

    index = ModelIndex(model)
    index.entries.update(split("fused", parts, sizes))
    sd = {}
    for p, n, r in zip(parts, sizes, rank, strict=True):
        sd[f"{p}.lora_A.weight"] = torch.randn(r, in_dim, generator=g).to(dtype)
        sd[f"{p}.lora_B.weight"] = torch.randn(n, r, generator=g).to(dtype)
        sd[f"{p}.alpha"] = torch.tensor(float(r) / 2)
    adapters = lp.load(sd)
    plan = index.resolve(adapters)
    assert not plan.unmatched
    x = torch.randn(3, in_dim, generator=g).to(dtype)
    w = model.fused.weight.detach().float()
    ref_w = w.clone()
    offset = 0
    for p, n in zip(parts, sizes, strict=True):
        ref_w[offset : offset + n] += (
            strength * 0.5 * sd[f"{p}.lora_B.weight"].float() @ sd[f"{p}.lora_A.weight"].float()
        )
        offset += n
    want = x.float() @ ref_w.T + model.fused.bias.detach().float()

    from loraplug import api

    snap = snapshot(model)
    bindings = [
        (0, plan.matched[p][0], specs.get("lora").build(adapters.adapters[p], index.ops["fused"], n))
        for p, n in zip(parts, sizes, strict=True)
    ]
    tol = {torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 1e-2}[dtype]
    scale = want.abs().max().item() + 1
    for mode in ("bypass", "merge"):
        handle = api.Handle(mode, [adapters], [strength], lp.Report())
        api._install(handle, index, bindings)
        with torch.no_grad():
            got = model.fused(x)
        assert got.dtype == dtype
        assert (got.float() - want).abs().max().item() <= tol * scale
        handle.remove()
        assert_identical(model, snap)


def test_layers_wrapped_by_peft_answer_to_their_own_names():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    sd = {"0.lora_A.weight": torch.randn(3, 8), "0.lora_B.weight": torch.randn(6, 3)}
    x = torch.randn(4, 8)
    with torch.no_grad():
        peft_only = peft(x)
        mine = base(x) + x @ sd["0.lora_A.weight"].T @ sd["0.lora_B.weight"].T
        with lp.apply(peft, sd) as handle:
            assert [str(t) for t in handle.report.matched["0"]] == ["base_model.model.0.base_layer"]
            close(peft(x), peft_only + mine - base(x), rtol=1e-5, atol=1e-5)
