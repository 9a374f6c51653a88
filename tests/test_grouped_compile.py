"""The grouped low-rank path equals the portable path; strength changes never recompile."""

import copy

import pytest
import torch
from conftest import close
from torch import nn

import loraplug as lp
from loraplug.runtime import bypass


def _model_and_adapters(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 8))
    g = torch.Generator().manual_seed(seed)
    lora = {
        "0.lora_A.weight": torch.randn(3, 12, generator=g),
        "0.lora_B.weight": torch.randn(24, 3, generator=g),
        "2.lora_A.weight": torch.randn(2, 24, generator=g),
        "2.lora_B.weight": torch.randn(8, 2, generator=g),
    }
    loha = {
        f"0.hada_w{i}_{ab}": torch.randn(*((24, 2) if ab == "a" else (2, 12)), generator=g) * 0.5
        for i in "12"
        for ab in "ab"
    }
    return model, lora, loha


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_portable(dtype):
    model, lora, loha = _model_and_adapters()
    model = model.to(dtype)
    x = torch.randn(2, 5, 12).to(dtype)
    handles = [lp.apply(model, lora, strength=0.7), lp.apply(model, loha, strength=-1.2)]
    runner = bypass.runners(model[0])
    with torch.no_grad():
        grouped = model(x)
        assert len(runner._lowrank) == 1 and len(next(iter(runner._lowrank.values())).entries) == 2
        runner.grouping = bypass.runners(model[2]).grouping = False
        portable = model(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = portable.float().abs().max().item()
    assert (grouped.float() - portable.float()).abs().max().item() <= tol * scale
    for h in handles:
        h.remove()


def test_strength_and_toggle_do_not_recompile():
    model, lora, loha = _model_and_adapters()
    plain = copy.deepcopy(model)
    handle = lp.apply(model, [lora, loha], strength=[1.0, 0.5])
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    x = torch.randn(4, 12)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(10):
                handle.set_strength([0.1 * i, -0.2 * i])
                got = compiled(x)
                ref = copy.deepcopy(plain)
                with lp.apply(ref, [lora, loha], strength=[0.1 * i, -0.2 * i]):
                    close(got, ref(x), rtol=1e-5, atol=1e-5)
            handle.disable()
            close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
            handle.enable()
            compiled(x)
    handle.remove()


def test_added_memory_is_one_copy_of_the_adapter():
    """Binding keeps the loaded tensors (no float32 masters); running adds one stacked copy."""
    model = nn.Sequential(nn.Linear(64, 96)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    sds = [
        {
            "0.lora_A.weight": torch.randn(8, 64, generator=g).bfloat16(),
            "0.lora_B.weight": torch.randn(96, 8, generator=g).bfloat16(),
        }
        for _ in range(2)
    ]
    sets = [lp.load(sd) for sd in sds]
    adapter_bytes = sum(t.numel() * t.element_size() for sd in sds for t in sd.values())
    handle = lp.apply(model, sets)
    with torch.no_grad():
        model(torch.randn(3, 64).bfloat16())
    runner = bypass.runners(model[0])
    for entry in runner.entries:
        assert entry.patch.down.data_ptr() in {t.data_ptr() for sd in sds for t in sd.values()}
        assert not entry.patch._cache
    (group,) = runner._lowrank.values()
    held = sum(
        t.numel() * t.element_size()
        for t in [group.down_t, *group.ups_t, group.rank_scale, group.static_scale]
    )
    assert held <= 1.05 * adapter_bytes
    handle.remove()


def _storages_held(group: bypass._LowRank, exclude: set[int]) -> int:
    """Bytes of the distinct storages a group's tensors live in, not counting ``exclude``."""
    tensors = [group.down_t, *group.ups_t, *group.run_ups(), group.rank_scale, group.static_scale]
    for fused in group.packs.values():
        tensors += [fused.down_t, fused.rank_scale, fused.hstart, fused.packed]
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(n for ptr, n in seen.items() if ptr not in exclude)


@pytest.mark.parametrize("packed", [False, True], ids=["portable", "packed"])
@pytest.mark.parametrize("slices", [1, 3], ids=["whole", "qkv"])
def test_stacked_adapters_cost_one_copy_in_the_activation_dtype(slices, packed):
    """Two LoRAs kept as float32 (as loaded), run in bf16: the group's bf16 tensors are one copy of
    the adapters — the stacked ups of each slice's run are not a second one (a view into the fused
    kernel's packing where it exists, else the members' own tensors are views into the stack).
    Slices one output tile wide: a packing of narrower ones holds zeros where a tile spans two."""
    from loraplug.runtime import kernels

    size = 256  # one output tile of the kernel per slice (Flux-dev's slices are 12 such tiles)
    model = nn.Sequential(nn.Linear(64, size * slices)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    names = ["q", "k", "v"][:slices] if slices > 1 else [None]
    sds = []
    for _ in range(2):
        sd = {}
        for name in names:
            key = "0" if name is None else f"0.{name}"
            sd[f"{key}.lora_A.weight"] = torch.randn(16, 64, generator=g)
            sd[f"{key}.lora_B.weight"] = torch.randn(size, 16, generator=g)
        sds.append(sd)
    if slices > 1:  # a fused qkv layer: the file's q/k/v keys land on its slices
        sets = [lp.load({k.replace("0.", "to_"): v for k, v in sd.items()}) for sd in sds]
        model = _FusedQkv()
    else:
        sets = [lp.load(sd) for sd in sds]
    x = torch.randn(5, 64).bfloat16()
    with torch.no_grad():
        plain = model(x)
    handle = lp.apply(model, sets)
    runner = bypass.runners(model.to_qkv if slices > 1 else model[0])
    (group,) = runner._lowrank.values()
    if packed:
        group.packed(kernels.config(False).bn)
    with torch.no_grad():
        got = model(x)
    own = {t.untyped_storage().data_ptr() for sd in sds for t in sd.values()}
    bf16_bytes = sum(t.numel() * 2 for sd in sds for t in sd.values())
    held = _storages_held(group, own)
    assert held <= 1.05 * bf16_bytes, (held, bf16_bytes)
    ref = plain.float()
    for sd in sds:  # the portable path's result, written out
        for i, name in enumerate(names):
            key = "0" if name is None else f"0.{name}"
            delta = x.float() @ sd[f"{key}.lora_A.weight"].T @ sd[f"{key}.lora_B.weight"].T
            ref[:, i * size : (i + 1) * size] += delta
    close(got.float(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())  # bf16 arithmetic
    handle.remove()


class _FusedQkv(nn.Module):
    """A fused q/k/v projection as diffusers leaves it after ``fuse_qkv_projections`` (the split
    layers kept, unused)."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(64, 256).to(torch.bfloat16) for _ in range(3))
        self.to_qkv = nn.Linear(64, 768).to(torch.bfloat16)
        self.fused_projections = True

    def forward(self, x):
        return self.to_qkv(x)


def test_an_fp8_base_without_kernels_has_its_group_before_compiling():
    """warm() builds the stacked adapters of an fp8 layer (bf16 activations) at apply, Triton or
    not: built lazily, a compiled graph would hold the build and redo it on every call."""
    from loraplug.runtime import kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    lp.quantize_fp8(model)
    g = torch.Generator().manual_seed(0)
    handle = lp.apply(model, {"0.lora_A.weight": torch.randn(4, 128, generator=g),
                              "0.lora_B.weight": torch.randn(64, 4, generator=g)})  # fmt: skip
    runner = bypass.runners(model[0])
    assert not (kernels.available() and runner.fused)  # this machine: no kernels for it
    assert (torch.device("cpu"), torch.bfloat16) in runner._lowrank
    handle.remove()


def _block_lora(model: nn.Module, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{name}.lora_{ab}.weight": torch.randn(*((2, m.in_features) if ab == "A" else (m.out_features, 2)), generator=g) * 0.2
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and "blocks." in name
        for ab in "AB"
    }  # fmt: skip


def test_blocks_compiled_one_by_one_share_their_kinds_graphs():
    """diffusers' regional compilation (``compile_repeated_blocks``: one compile per block kind)
    with adapters applied: the blocks reuse their kind's graph as on the plain model (each block's
    adapters are graph inputs, not constants baked into a graph per block), outputs follow the
    eager model, and strength changes never recompile."""
    from torch._dynamo.utils import counters

    from loraplug.testing import flux_inputs, tiny_flux

    inputs = flux_inputs()

    def graphs(model) -> int:
        torch._dynamo.reset()
        counters.clear()
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        model(**inputs)
        return counters["stats"]["unique_graphs"]

    with torch.no_grad():
        plain_graphs = graphs(tiny_flux(layers=3, single_layers=3))
        model, eager = tiny_flux(layers=3, single_layers=3), tiny_flux(layers=3, single_layers=3)
        lora = _block_lora(model)
        handle, reference = lp.apply(model, lora), lp.apply(eager, lora)
        assert graphs(model) == plain_graphs < 6
        with torch._dynamo.config.patch(error_on_recompile=True):
            for strength in (0.5, -1.0):
                handle.set_strength(strength)
                reference.set_strength(strength)
                close(model(**inputs)[0], eager(**inputs)[0], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("ranks", [[4], [12], [4, 4], [4, 12]], ids=["4", "12", "4+4", "4+12"])
def test_packed_ranks_off_the_multiple_of_eight_cost_one_copy(ranks):
    """A packed group (fused kernel: fp8 bases, `shapes` on an H100) of LoRAs whose ranks are not
    multiples of 8 holds one copy of them, like the portable path (it held 2.34× for one rank 4,
    1.67× for rank 12 and 3.0× for two stacked rank 4 while the packing padded every entry's ranks
    to 8: P and a gathered copy of the down projections)."""
    from loraplug.runtime import kernels

    model = nn.Sequential(nn.Linear(256, 512)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    sds = [{"0.lora_A.weight": torch.randn(r, 256, generator=g), "0.lora_B.weight": torch.randn(512, r, generator=g)} for r in ranks]  # fmt: skip
    handle = lp.apply(model, [lp.load(sd) for sd in sds])
    x = torch.randn(3, 256).bfloat16()
    with torch.no_grad():
        model(x)
    (group,) = bypass.runners(model[0])._lowrank.values()
    fused = group.packed(kernels.config(False).bn)
    assert fused.columns is None and fused.packed.shape == (sum(ranks), 512)
    own = {t.untyped_storage().data_ptr() for sd in sds for t in sd.values()}
    held = _storages_held(group, own)
    handle.remove()
    assert held <= 1.05 * sum(t.numel() * 2 for sd in sds for t in sd.values()), held


def test_compiled_slices_scale_the_block_up_not_the_hidden_activation(monkeypatch):
    """Under torch.compile a module with adapters on several output slices (q/k/v of a fused
    projection) scales each rank's row of the block up projection, in the kernel that pads it,
    instead of making a pass over the hidden activation x·Aᵀ: no operator but the up GEMM reads
    that. Strength changes still reach the graph without re-tracing, and the output is exact."""
    from loraplug import arch

    names = ("q", "k", "v")
    monkeypatch.setattr(arch, "PROVIDERS", [*arch.PROVIDERS, lambda model, ops: (
        {n: [arch.Target("0", 8 * i, 8)] for i, n in enumerate(names)}, set())])  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24))
    g = torch.Generator().manual_seed(0)
    lora = {
        f"{name}.lora_{ab}.weight": torch.randn(*((3, 12) if ab == "A" else (8, 3)), generator=g)
        for name in names
        for ab in "AB"
    }
    x = torch.randn(4, 12)
    with torch.no_grad():
        plain = model(x)

    def want(strength):
        with torch.no_grad():
            return plain + strength * torch.cat([(x @ lora[f"{n}.lora_A.weight"].T) @ lora[f"{n}.lora_B.weight"].T for n in names], -1)  # fmt: skip

    handle = lp.apply(model, lora, strength=0.5)
    modules = []

    def record(gm, example_inputs):
        modules.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for strength in (0.5, -1.5):
            handle.set_strength(strength)
            close(compiled(x), want(strength), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    handle.remove()
    (gm,) = modules
    hidden = next(n for n in gm.graph.nodes if n.target is torch.mm)  # x·Aᵀ, the first GEMM
    assert [u.target for u in hidden.users] == [torch.mm], list(hidden.users)
