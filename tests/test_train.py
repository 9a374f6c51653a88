"""Bypass training: planted changes recovered (loss ÷100) for every algorithm; the saved file
reproduces the trained model in the reference tools; quantized bases; determinism and resume."""

import copy
import runpy
from pathlib import Path

import pytest
import torch
from conftest import assert_identical, close, snapshot
from torch import nn

import loraplug as lp

ROOT = Path(__file__).resolve().parents[1]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


CASES = {  # algo, create kwargs, planted noise, steps, lr
    "lora": ("lora", {}, 0.3, 600, 2e-2),
    "dora": ("lora", {"dora": True}, 0.3, 600, 2e-2),
    "loha": ("loha", {}, 0.1, 1500, 5e-2),
    "lokr": ("lokr", {}, 0.2, 600, 2e-2),
    "oft": ("oft", {}, 0.1, 600, 2e-2),
    "boft": ("boft", {}, 0.1, 600, 2e-2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_planted_change_is_recovered(case):
    algo, kwargs, noise, steps, lr = CASES[case]
    teacher = _mlp()
    planted = lp.create(teacher, algo, rank=4, targets="all-linear", seed=1, **kwargs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in planted.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
        xs = [torch.randn(64, 16, generator=g) for _ in range(8)]
        data = [(x, teacher(x)) for x in xs]
    student = _mlp()
    snap = snapshot(student)
    handle = lp.create(student, algo, rank=4, targets="all-linear", seed=3, **kwargs)
    assert all(not p.requires_grad for p in student.parameters())  # base frozen, nothing copied
    result = lp.train(handle, data, lambda b: nn.functional.mse_loss(student(b[0]), b[1]),
                      steps=steps, lr=lr, schedule="cosine", progress=False)  # fmt: skip
    assert result.losses[0] / min(result.losses[-10:]) >= 100, (result.losses[0], result.losses[-1])
    handle.remove()
    assert_identical(student, snap)


def test_fused_flux_lora_saves_split_and_loads_in_diffusers(tmp_path):
    result = runpy.run_path(str(ROOT / "examples" / "train_tiny_flux.py"))["main"](
        steps=20, out=str(tmp_path / "trained.safetensors")
    )
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    names = list(result.adapters.adapters)
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.add_k_proj" in names
    from loraplug.testing import flux_inputs, tiny_flux

    inputs = flux_inputs(image_tokens=16, text_tokens=6)
    trained = tiny_flux()
    trained.fuse_qkv_projections()
    with lp.apply(trained, tmp_path / "trained.safetensors") as handle, torch.no_grad():
        assert handle.report.ok and len(handle.report.fused) > 0
        want = trained(**inputs)[0]
    reference = tiny_flux()  # split layout, through diffusers + PEFT
    reference.load_lora_adapter(str(tmp_path), weight_name="trained.safetensors", prefix="transformer")
    with torch.no_grad():
        close(reference(**inputs)[0], want, rtol=1e-5, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "trained.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (
        meta["base_model"] == "tiny-flux" and meta["loraplug_algo"] == "lora" and "loraplug_version" in meta
    )


@pytest.mark.parametrize("algo", ["loha", "lokr", "oft"])
def test_trained_lycoris_algorithms_load_in_lycoris(tmp_path, algo):
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    model = _mlp()
    handle = lp.create(model, algo, rank=4, targets="all-linear")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g))]
    result = lp.train(handle, data, lambda b: nn.functional.mse_loss(model(b[0]), b[1]), steps=20, lr=1e-2,
                      progress=False)  # fmt: skip
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = model(x)
    handle.remove()
    path = lp.save(result, tmp_path / "t.safetensors", format="kohya")
    reference = copy.deepcopy(model)
    prefix, LycorisNetwork.LORA_PREFIX = LycorisNetwork.LORA_PREFIX, "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, str(path), reference)
        network.apply_to()
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    with torch.no_grad():
        close(reference(x), want, rtol=1e-5, atol=1e-5)


def test_training_on_an_int8_base(tmp_path):
    torchao = pytest.importorskip("torchao.quantization")
    model = _mlp()
    torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    weights = [m.weight.qdata.clone() for m in (model[0], model[2])]
    handle = lp.create(model, "lora", rank=4, targets="all-linear")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g))]
    result = lp.train(handle, data, lambda b: nn.functional.mse_loss(model(b[0]), b[1]), steps=30, lr=1e-2,
                      progress=False)  # fmt: skip
    assert result.losses[-1] < result.losses[0]
    for m, w in zip((model[0], model[2]), weights, strict=True):
        assert torch.equal(m.weight.qdata, w)
    handle.remove()


def test_deterministic_and_resumable(tmp_path):
    def run(steps, resume=None, checkpoint=None):
        model = _mlp()
        handle = lp.create(model, "lora", rank=2, targets="all-linear")
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)) for _ in range(3)]
        return lp.train(handle, data, lambda b: nn.functional.mse_loss(model(b[0]), b[1]), steps=steps, lr=1e-2,
                        resume=resume, checkpoint=checkpoint, progress=False).losses  # fmt: skip

    def same(a, b):  # up to the order of float reductions
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0)

    straight = run(20)
    same(straight, run(20))
    ckpt = tmp_path / "state.pt"
    same(run(10, checkpoint=ckpt), straight[:10])
    same(run(20, resume=ckpt), straight)


def test_targets_presets_and_errors():
    from loraplug.testing import tiny_flux

    model = tiny_flux()
    model.fuse_qkv_projections()
    handle = lp.create(model, "lora", rank=2, targets="attn")
    names = set(handle.adapters[0].adapters)
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.to_qkv" not in names
    assert not any("proj_mlp" in n for n in names)
    handle.remove()
    with pytest.raises(lp.LoraplugError, match="match no"):
        lp.create(model, "lora", targets=[r"nothing_like_this$"])
    with pytest.raises(lp.LoraplugError, match="algo"):
        lp.create(model, "glora", targets="attn")


def test_gradient_checkpointing_and_autocast():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _mlp()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g))]
    losses = {}
    for name, wrap in (("plain", False), ("checkpointed", True)):
        model = Checkpointed() if wrap else _mlp()
        net = model.inner if wrap else model
        handle = lp.create(net, "lora", rank=2, targets="all-linear")
        with torch.no_grad():
            for p in handle.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        losses[name] = lp.train(handle, data, lambda b, m=model: nn.functional.mse_loss(m(b[0]), b[1]), steps=5,
                                lr=1e-2, progress=False).losses  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(losses["plain"]), torch.tensor(losses["checkpointed"]), rtol=1e-5, atol=0
    )
    model = _mlp()
    handle = lp.create(model, "lora", rank=2, targets="all-linear")
    result = lp.train(handle, data, lambda b: nn.functional.mse_loss(model(b[0]).float(), b[1]), steps=5, lr=1e-2,
                      autocast_dtype=torch.bfloat16, progress=False)  # fmt: skip
    assert all(p.dtype == torch.float32 and p.grad is None for p in handle.parameters())
    assert len(result.losses) == 5


def test_compiled_training_matches_eager():
    """compile=True trains the same adapters (one graph with the bypass inside) and leaves the model
    eager afterwards."""

    def run(compile):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        handle = lp.create(model, "lora", rank=4, targets="all-linear", init="gaussian")
        data = [(torch.randn(32, 16), torch.randn(32, 16)) for _ in range(2)]
        result = lp.train(handle, data, lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]),
                          steps=4, lr=1e-2, progress=False, compile=compile)  # fmt: skip
        assert model._compiled_call_impl is None
        return result.losses

    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    torch._dynamo.reset()
    assert run("reduce-overhead") == pytest.approx(eager, rel=1e-4)  # CUDA graphs where there is CUDA
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(lp.LoraplugError, match="torch.compile mode"):
        lp.train(lp.create(model, "lora", rank=2, targets="all-linear"), [torch.randn(2, 4)],
                 lambda b: model(b).sum(), steps=1, progress=False, compile="fast")  # fmt: skip


def test_training_with_blocks_compiled_one_by_one_matches_eager():
    """regional=True compiles each Flux block (one compile per block kind) and trains the same
    adapters as eager; the blocks are eager again afterwards; a model without named repeated
    blocks, or regional without compile, is refused."""
    from loraplug.testing import flux_inputs, tiny_flux

    inputs = flux_inputs()
    target = torch.randn_like(inputs["hidden_states"])

    def run(**kw):
        torch._dynamo.reset()
        model = tiny_flux(layers=1, single_layers=2)
        handle = lp.create(model, "lora", rank=2, targets="attn+mlp", init="random")
        loss = lambda _: nn.functional.mse_loss(model(**inputs)[0], target)  # noqa: E731
        result = lp.train(handle, [None], loss, steps=3, lr=1e-2, progress=False, **kw)
        assert all(m._compiled_call_impl is None for m in model.modules())
        return result.losses

    from torch._dynamo.utils import counters

    eager = run()
    counters.clear()
    assert run(compile=True, regional=True) == pytest.approx(eager, rel=1e-4)
    assert counters["stats"]["unique_graphs"] >= 2  # a graph per block kind (the whole model: one)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    handle = lp.create(model, "lora", rank=2, targets="all-linear")
    with pytest.raises(lp.LoraplugError, match="repeated blocks"):
        lp.train(handle, [torch.randn(2, 4)], lambda b: model(b).sum(), steps=1, progress=False, compile=True, regional=True)  # fmt: skip
    with pytest.raises(lp.LoraplugError, match="compile=True"):
        lp.train(handle, [torch.randn(2, 4)], lambda b: model(b).sum(), steps=1, progress=False, regional=True)  # fmt: skip


@pytest.mark.parametrize(
    "algo, options, env, compile",
    [("lora", {}, "1", False), ("lora", {}, "1", True), ("lora", {}, "0", False),
     ("lora", {"dora": True}, "1", False), ("loha", {}, "1", False), ("lokr", {}, "1", False),
     ("oft", {"rank": 4}, "1", False), ("boft", {"rank": 4}, "1", False)],
)  # fmt: skip
def test_save_memory_trains_the_same(algo, options, env, compile, monkeypatch):
    """save_memory=True (each block under selective activation checkpointing) trains exactly the
    adapters the default step trains, on a tiny Flux with q/k/v fused: every trainable algorithm
    eager, LoRA compiled too, and LoRA through autograd's separate GEMMs
    (``LORAPLUG_TRAIN_GEMM=0``, whose accumulation into a kept GEMM output must not happen in
    place); the blocks' own forward comes back afterwards."""
    from loraplug.testing import flux_inputs, tiny_flux

    monkeypatch.setenv("LORAPLUG_TRAIN_GEMM", env)
    inputs = flux_inputs()
    target = torch.randn_like(inputs["hidden_states"])

    def run(save_memory):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny_flux(layers=1, single_layers=1)
        model.fuse_qkv_projections()
        handle = lp.create(model, algo, targets="attn+mlp", init="random", **{"rank": 2, **options})
        loss = lambda _: nn.functional.mse_loss(model(**inputs)[0], target)  # noqa: E731
        result = lp.train(
            handle, [None], loss, steps=3, lr=1e-2, progress=False, compile=compile, save_memory=save_memory
        )
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        assert all("forward" not in block.__dict__ for block in blocks)
        return result.losses, [p.detach().clone() for p in handle.parameters()]

    losses, params = run(False)
    saving_losses, saving_params = run(True)
    assert saving_losses == pytest.approx(losses, rel=1e-5 if compile else 1e-6)
    for a, b in zip(saving_params, params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_save_memory_on_a_model_without_repeated_blocks():
    """A model that names no repeated blocks runs whole under selective checkpointing: the same
    training, and its own forward back afterwards."""

    def run(save_memory):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        handle = lp.create(model, "lora", rank=4, targets="all-linear", init="random")
        data = [(torch.randn(32, 16), torch.randn(32, 16)) for _ in range(2)]
        wrapped = []

        def loss(batch):
            wrapped.append("forward" in model.__dict__)  # checkpointed while training
            return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

        losses = lp.train(
            handle, data, loss, steps=3, lr=1e-2, progress=False, save_memory=save_memory
        ).losses
        assert set(wrapped) == {save_memory} and "forward" not in model.__dict__
        return losses

    assert run(True) == pytest.approx(run(False), rel=1e-6)


def test_save_memory_keeps_less_than_the_frozen_step_and_recomputes_no_gemm():
    """Compiled, the LoRA step under ``saving_memory`` keeps fewer bytes for its backward than the
    frozen model's step (the adapters' inputs, GELU's output, norms and concatenations are
    recomputed from what the GEMMs and attention kept), and no GEMM or attention of the forward
    runs again in the backward. A forward set on the instance (accelerate's hooks) is put back."""
    from loraplug.bench import gemms_and_attention, recompute_reshaping, saved_activations
    from loraplug.testing import flux_inputs, tiny_flux
    from loraplug.train import saving_memory

    model = tiny_flux(layers=1, single_layers=1, heads=2, head_dim=16).train().requires_grad_(False)
    model.fuse_qkv_projections()

    def step(input_grad):
        def run(compile_fn):
            inputs = {**flux_inputs(image_tokens=64, text_tokens=16), "return_dict": False}
            inputs["hidden_states"].requires_grad_(input_grad)
            compile_fn(model)(**inputs)[0].float().pow(2).mean().backward()

        return run

    frozen, _ = saved_activations(step(True))
    lp.create(model, "lora", rank=4, alpha=4, targets="attn+mlp", init="random")
    kept, backward = saved_activations(step(False))
    hooked = model.transformer_blocks[0]
    hooked.forward = hook = hooked.forward  # an instance attribute, as accelerate sets
    with saving_memory(model):
        kept_saving, backward_saving = saved_activations(step(False))
    assert hooked.__dict__["forward"] is hook and "forward" not in model.single_transformer_blocks[0].__dict__
    total = [sum(size for *_, size in rows) for rows in (frozen, kept, kept_saving)]
    assert total[2] < total[0] < total[1]
    heavy = gemms_and_attention(backward)
    assert gemms_and_attention(backward_saving) == heavy  # the backward's own GEMMs only, none again
    assert any("lora_under_base_v2_backward" in op for op in heavy)
    with saving_memory(model, policy=recompute_reshaping):  # the narrower probe policy
        kept_reshaping, backward_reshaping = saved_activations(step(False))
    assert total[2] < sum(size for *_, size in kept_reshaping) < total[1]
    assert gemms_and_attention(backward_reshaping) == heavy


def test_recompute_reshaping_gives_the_same_gradients():
    """``loraplug.bench.recompute_reshaping`` (a narrower policy for ``saving_memory``, for
    compiled steps; ``save_memory``'s own in eager mode, where its in-place ops would raise)
    changes what the backward keeps, not the gradients, compiled or eager."""
    from loraplug.bench import recompute_reshaping
    from loraplug.testing import flux_inputs, tiny_flux
    from loraplug.train import saving_memory

    torch.manual_seed(0)
    model = tiny_flux(layers=1, single_layers=1).requires_grad_(False)
    model.fuse_qkv_projections()
    handle = lp.create(model, "lora", rank=2, targets="attn+mlp", init="random")
    inputs = flux_inputs()

    def gradients(compiled=True):
        torch._dynamo.reset()
        (torch.compile(model) if compiled else model)(**inputs)[0].pow(2).mean().backward()
        grads = [p.grad.clone() for p in handle.parameters()]
        for p in handle.parameters():
            p.grad = None
        return grads

    plain = gradients()
    with saving_memory(model, policy=recompute_reshaping):
        reshaping = gradients()
        eager = gradients(compiled=False)
    for a, b, c in zip(reshaping, eager, plain, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_training_graph_returns_only_the_output(dtype):
    """Trained adapters (float32 masters cast to a bf16 model's activations, or of the model's own
    dtype) leave nothing on the runner from inside a compiled graph: a tensor stored there becomes
    an extra graph output whose gradient is fed back (zeros) every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).to(torch.bfloat16)
    handle = lp.create(model, "lora", rank=4, targets="all-linear", init="random", dtype=dtype)
    outputs = []

    def record(gm, example_inputs):
        outputs.append(len(gm.graph.output_node().args[0]))
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    for _ in range(2):  # the second call runs the cached graph (no re-trace)
        torch.compile(model, backend=record)(x).float().sum().backward()
    torch._dynamo.reset()
    assert outputs == [1]
    assert all(p.grad is not None for p in handle.parameters())
    handle.remove()


@pytest.mark.parametrize("init", ["standard", "gaussian", "random"])
def test_inits(init):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32))
    x = torch.randn(4, 16)
    base = model(x)
    handle = lp.create(model, "lora", rank=4, targets="all-linear", init=init)
    adapter = next(iter(handle.adapters[0].adapters.values()))
    changed = not torch.allclose(model(x), base)
    assert changed == (init == "random")
    if init == "gaussian":
        assert adapter.tensors["down"].std().item() == pytest.approx(0.25, rel=0.3)
    handle.remove()
    with pytest.raises(lp.LoraplugError, match="init="):
        lp.create(model, "lora", targets="all-linear", init="kaiming")


def test_adapters_in_the_base_dtype_train_and_8_bit_is_refused():
    """dtype=torch.bfloat16 (what diffusers' add_adapter gives PEFT's adapters): half the memory
    of float32 masters for the parameters, their gradients and the optimizer's state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).to(torch.bfloat16)
    target = copy.deepcopy(model)
    with torch.no_grad():
        target[0].weight.add_(0.3 * torch.randn(32, 2) @ torch.randn(2, 16))
    data = [(x := torch.randn(64, 16, dtype=torch.bfloat16), target(x).detach())]
    full = lp.create(copy.deepcopy(target), "lora", rank=2, targets="all-linear")
    handle = lp.create(model, "lora", rank=2, targets="all-linear", init="gaussian", dtype=torch.bfloat16)
    assert {p.dtype for p in handle.parameters()} == {torch.bfloat16}
    assert sum(p.nbytes for p in handle.parameters()) * 2 == sum(p.nbytes for p in full.parameters())
    result = lp.train(handle, data, lambda b: ((model(b[0]) - b[1]).float() ** 2).mean(), steps=150, lr=2e-2,
                      progress=False)  # fmt: skip
    assert result.losses[-1] < result.losses[0] / 10
    for bad in (torch.float8_e4m3fn, torch.int8, "bfloat16"):
        with pytest.raises(lp.LoraplugError, match="8-bit"):
            lp.create(nn.Sequential(nn.Linear(4, 4)), "lora", rank=2, targets="all-linear", dtype=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_masters_on_a_bf16_base_match_the_float32_product(dtype):
    """Adapters of another dtype than the activations (float32 masters on a bf16 base: cast, and
    their scale folded into the cast down projection) give the output and gradients of the float32
    product scale·(x Aᵀ) Bᵀ; adapters in the base's dtype likewise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48)).to(torch.bfloat16)
    handle = lp.create(model, "lora", rank=4, alpha=2.0, targets="all-linear", init="random", dtype=dtype)
    down, up = sorted(handle.parameters(), key=lambda p: p.shape[0])  # (4, 32), (48, 4)
    with torch.no_grad():
        down.normal_(), up.normal_()  # a change as large as the base output
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    grad = torch.randn(64, 48)
    model(x).float().backward(grad)
    got = model(x).float()
    grads = [p.grad.float().clone() for p in (down, up)]
    for p in (down, up):
        p.grad = None
    d, u = down.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    base = x.float() @ model[0].weight.float().T + model[0].bias.float()
    want = base + 0.5 * (x.float() @ d.T) @ u.T  # scale alpha / rank
    want.backward(grad)
    for a, b in ((got, want), (grads[0], d.grad), (grads[1], u.grad)):  # bf16 compute: 1e-2 of the norm
        assert (a - b).norm() / b.norm() < 1e-2
    with torch.no_grad():  # a sign error or a missing scale is far outside these tolerances
        assert (got - base).abs().max() > 1.0


@pytest.mark.parametrize("option", [{"compile": True}, {"save_memory": True}])
def test_options_that_wrap_the_model_need_it_alive(option):
    """compile/save_memory wrap the model itself: a handle whose model was freed gets a clear error."""
    import gc

    model = _mlp()
    handle = lp.create(model, "lora", rank=2, targets="all-linear")
    del model
    gc.collect()
    assert handle.model_ref() is None
    batch = torch.randn(4, 16)
    with pytest.raises(lp.LoraplugError, match=f"{next(iter(option))}=True needs the handle"):
        lp.train(handle, [batch], lambda b: b.sum(), steps=1, progress=False, **option)
