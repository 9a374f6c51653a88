"""GPU benchmarks (``loraplug bench``), Flux-dev size (19 double + 38 single blocks, hidden 3072,
1024x1024: 4096 image + 512 text tokens), random weights, bf16, one GPU.

- ``main``: the full diffusers FluxTransformer2DModel (split and fused layouts; base, merged, PEFT,
  loraplug portable and fused, two LoRAs, fp8 base, torch.compile).
- ``linear_stack``: only its linear layers in BFL layout (fused qkv / linear1), the issue's
  micro-benchmark: cuBLAS base, the Triton GEMM alone per tile configuration, loraplug portable and
  fused with r16 / r64 / two r16, fp8 base with and without a LoRA, PEFT on the split layers.

Every variant is timed in one process with CUDA events (warm-ups, median of ITERS) and reported as a
ratio to the base measured in the same run. Writes JSON to $OUT (or .).

    loraplug bench [--compile] [--blocks 2 4]       # or: python benchmarks/flux_bench.py
    loraplug bench --suite linear                   # or: python benchmarks/linear_stack.py
    loraplug bench --results results.json           # a saved run as a table
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
from rich.table import Table

from . import api as lp
from .arch.diffusers import share_fused_weights

DEV, DT = "cuda", torch.bfloat16
ITERS = int(os.environ.get("ITERS", 10))
CFG = dict(
    patch_size=1, in_channels=64, num_layers=int(os.environ.get("ND", 19)),
    num_single_layers=int(os.environ.get("NS", 38)), attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)  # fmt: skip
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "proj_mlp", "proj_out")  # fmt: skip
T_IMG, T_TXT = 4096, 512


def inputs(image_tokens: int = T_IMG, device: str = DEV) -> dict:
    """Keyword inputs of a Flux-dev-size model (``CFG``): ``image_tokens`` (4096 at 1024², 1024 at
    512²) and 512 text tokens, bf16, seeded."""
    g = torch.Generator(device=device).manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, image_tokens, 64, device=device, dtype=DT, generator=g),
        encoder_hidden_states=torch.randn(1, T_TXT, 4096, device=device, dtype=DT, generator=g),
        pooled_projections=torch.randn(1, 768, device=device, dtype=DT, generator=g),
        timestep=torch.tensor([0.5], device=device, dtype=DT),
        guidance=torch.tensor([3.5], device=device, dtype=DT),
        img_ids=torch.zeros(image_tokens, 3, device=device),
        txt_ids=torch.zeros(T_TXT, 3, device=device),
        return_dict=False,
    )


def diffusers_lora(model, rank: int, seed: int) -> dict:
    """A diffusers-format LoRA (split q/k/v names) on every projection of every block."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "blocks." in name and name.endswith(TARGETS):
            sd[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, mod.in_features, device=DEV, dtype=DT, generator=g) * 0.01
            )
            sd[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(mod.out_features, rank, device=DEV, dtype=DT, generator=g) * 0.01
            )
    return sd


class Bench:
    def __init__(self):
        self.res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        self.inp = inputs()

    @torch.no_grad()
    def time(self, model, name: str) -> float:
        self.res[name + "_ms"] = _time_fn(lambda: model(**self.inp), warmup=3)
        print(f"{name:36s} {self.res[name + '_ms']:8.2f} ms", flush=True)
        return self.res[name + "_ms"]

    def memory(self, name: str) -> None:
        self.res[name + "_GB"] = torch.cuda.memory_allocated() / 1e9


H, MLP = 3072, 12288
# (BFL module, in, out, stream) per double block, then per single block; stream picks the tokens
DOUBLE = [
    (f"{s}_{m}", i, o, s)
    for s in ("img", "txt")
    for m, i, o in (("attn.qkv", H, 3 * H), ("attn.proj", H, H), ("mlp.0", H, MLP), ("mlp.2", MLP, H))
]
SINGLE = [("linear1", H, 3 * H + MLP, "all"), ("linear2", H + MLP, H, "all")]
# the diffusers (split) names of each BFL module's parts, with their widths
DIFFUSERS_PARTS = {
    "img_attn.qkv": [("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H)],
    "txt_attn.qkv": [("attn.add_q_proj", H), ("attn.add_k_proj", H), ("attn.add_v_proj", H)],
    "img_attn.proj": [("attn.to_out.0", H)], "txt_attn.proj": [("attn.to_add_out", H)],
    "img_mlp.0": [("ff.net.0.proj", MLP)], "img_mlp.2": [("ff.net.2", H)],
    "txt_mlp.0": [("ff_context.net.0.proj", MLP)], "txt_mlp.2": [("ff_context.net.2", H)],
    "linear1": [("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H), ("proj_mlp", MLP)],
    "linear2": [("proj_out", H)],
}  # fmt: skip
TOKENS = {"img": T_IMG, "txt": T_TXT, "all": T_IMG + T_TXT}


def stack_layers(nd: int, ns: int) -> list[tuple[str, str, int, int, str]]:
    """(BFL name, diffusers block prefix, in, out, stream) for every linear layer of the stack."""
    return [(f"double_blocks.{b}.{n}", f"transformer_blocks.{b}", i, o, s) for b in range(nd) for n, i, o, s in DOUBLE] + [
        (f"single_blocks.{b}.{n}", f"single_transformer_blocks.{b}", i, o, s) for b in range(ns) for n, i, o, s in SINGLE
    ]  # fmt: skip


def stack_lora(layers: list, rank: int, seed: int) -> dict:
    """A diffusers-format (split q/k/v) LoRA on every layer of the stack."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    sd = {}
    for name, prefix, i, _, _ in layers:
        for part, width in DIFFUSERS_PARTS[name.split(".", 2)[2]]:
            key = f"transformer.{prefix}.{part}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, i, device=DEV, dtype=DT, generator=g) * 0.01
            sd[f"{key}.lora_B.weight"] = torch.randn(width, rank, device=DEV, dtype=DT, generator=g) * 0.01
    return sd


def _time_fn(fn, iters: int = ITERS, warmup: int = 2) -> float:
    """Median milliseconds of ``iters`` calls, each between CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph_time_fn(fn, repeat: int = 20) -> float:
    """Milliseconds per call of ``fn`` replayed from one CUDA graph of ``repeat`` calls (no host
    launch cost: the device time of short kernels); median of 10 replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return statistics.median(times)


BF16_TILES = [
    (128, 256, 64, 8, 3, True, True),
    (128, 256, 64, 8, 3, True, False),
    (128, 256, 64, 8, 3, False),
]
FP8_TILES = [
    (128, 256, 128, 8, 3, True, True),
    (256, 128, 128, 8, 3, True, True),
    (128, 256, 128, 8, 4, False),
]


_VIEW_OPS = {"view", "_unsafe_view", "permute", "slice", "reshape", "expand", "select", "transpose",
             "unsqueeze", "squeeze", "t", "detach", "alias", "as_strided"}  # fmt: skip


def _viewed(node: torch.fx.Node) -> torch.fx.Node:
    """The graph node whose storage ``node`` views (itself if it is no view)."""

    def op(n: torch.fx.Node) -> str:
        target = str(n.target)
        return target.split(".")[1] if target.startswith("aten.") else target.split(".")[-1]

    while node.op == "call_function" and op(node) in _VIEW_OPS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def saved_activations(step) -> tuple[list[tuple[str, tuple, int]], collections.Counter]:
    """What a compiled training step keeps for its backward, when ``step(compile)`` runs one
    through ``compile`` (``torch.compile`` with AOTAutograd's min-cut partition, as Inductor splits
    it, and no code generation; runs on a CPU): (name, shape, bytes) of every saved activation, each
    storage once, inputs and parameters not counted; and how often each operator runs in the
    backward graphs (a forward GEMM or attention there is recomputation)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    saved: list[tuple[str, tuple, int]] = []
    backward_ops: collections.Counter = collections.Counter()

    def forward_compiler(gm: torch.fx.GraphModule, _):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for node in {_viewed(n) for n in outputs if isinstance(n, torch.fx.Node)}:
            value = node.meta.get("val")
            if node.op != "placeholder" and isinstance(value, torch.Tensor):
                saved.append((node.name, tuple(value.shape), value.numel() * value.element_size()))
        return make_boxed_func(gm.forward)

    def backward_compiler(gm: torch.fx.GraphModule, _):
        backward_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=backward_compiler,
        partition_fn=min_cut_rematerialization_partition,
        decompositions=select_decomp_table(),  # Inductor's: the graph it partitions
    )
    torch._dynamo.reset()
    try:
        step(lambda fn: torch.compile(fn, backend=backend))
    finally:
        torch._dynamo.reset()
    return saved, backward_ops


# what ``recompute_reshaping`` lets the backward run again: copies, concatenations, activations
RESHAPING = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
             "slice", "select", "split", "unbind", "alias", "clone", "cat", "gelu", "tanh", "silu"}  # fmt: skip


def recompute_reshaping(ctx, op, *args, **kwargs):
    """A narrower policy for ``loraplug.train.saving_memory`` (a probe, not what ``lp.train`` runs):
    recompute only reshaping, concatenation and activations, whose inputs the backward keeps
    anyway (the single blocks' ``proj_out`` input is cat(attention, gelu(mlp)): 47 MB a block at
    512²); keep GEMMs and attention, and let the partitioner decide the rest (norms, modulation,
    rotary embedding), which ``save_memory`` recomputes. In eager mode it is ``save_memory``'s
    policy: there checkpointing caches every output it may keep, and an in-place op on one raises."""
    from torch.utils.checkpoint import CheckpointPolicy

    from .train import keep_or_recompute

    if not torch.compiler.is_compiling():
        return keep_or_recompute(ctx, op, *args, **kwargs)
    if getattr(op, "namespace", "") == "aten" and getattr(op, "_opname", "") in RESHAPING:
        return CheckpointPolicy.PREFER_RECOMPUTE
    kept = keep_or_recompute(ctx, op, *args, **kwargs) == CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_SAVE


def gemms_and_attention(ops: collections.Counter) -> dict[str, int]:
    """The GEMM and attention operators among ``ops`` (names as ``saved_activations`` counts them),
    loraplug's own included."""
    return {op: n for op, n in ops.items() if re.search(r"lora_under_base|addmm|\.mm\.|bmm|attention", op)}


def saved_activations_eager(step, model: torch.nn.Module) -> int:
    """Bytes autograd keeps for the backward while ``step()`` runs ``model``'s forward eagerly:
    every saved storage once, the model's parameters and buffers not counted."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(kept.values())


def _flatten_variants(fp8: bool) -> list:
    """The current tiles with the tile loop flattened or not (Tiles.flatten)."""
    from .runtime import kernels

    return [kernels.config(fp8)._replace(flatten=f) for f in (True, False)]


def _sweep(res: dict, prefix: str, tiles: list, fn) -> tuple:
    """Time ``fn`` under each tile configuration (skipping those the GPU cannot hold); the best."""
    from .runtime import kernels

    key = "fp8" if "fp8" in prefix else "bf16"
    for t in tiles:
        kernels.CONFIGS[key] = t
        try:
            res[f"{prefix}_{'x'.join(map(str, t))}_ms"] = _time_fn(fn)
        except Exception as err:  # e.g. shared memory exceeded on this GPU
            res[f"{prefix}_{'x'.join(map(str, t))}_error"] = f"{type(err).__name__}: {err}"[:200]
    timed = [t for t in tiles if f"{prefix}_{'x'.join(map(str, t))}_ms" in res]
    best = min(timed, key=lambda t: res[f"{prefix}_{'x'.join(map(str, t))}_ms"])
    kernels.CONFIGS[key] = best
    return best


@torch.no_grad()
def linear_stack() -> dict:
    """The linear-layer micro-benchmark; returns (and writes) the results."""
    from . import fp8 as fp8_mod
    from .runtime import kernels

    tk = importlib.import_module("loraplug.runtime.triton_kernels") if kernels.available() else None

    nd, ns = int(os.environ.get("ND", 19)), int(os.environ.get("NS", 38))
    layers = stack_layers(nd, ns)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "suite": "linear_stack"}
    g = torch.Generator(device=DEV).manual_seed(0)
    root = torch.nn.Module()
    for name, _, i, o, _ in layers:
        lin = torch.nn.Linear(i, o, bias=True, device=DEV, dtype=DT)
        torch.nn.init.normal_(lin.weight, std=0.02, generator=g)
        torch.nn.init.normal_(lin.bias, std=0.02, generator=g)
        _set_module(root, name, lin)
    root.requires_grad_(False)
    xs = {(i, s): torch.randn(TOKENS[s], i, device=DEV, dtype=DT, generator=g) for _, _, i, _, s in layers}
    plan = [(root.get_submodule(name), xs[(i, s)]) for name, _, i, _, s in layers]

    def record(key: str, ms: float) -> None:
        res[key + "_ms"] = ms
        print(f"{key:40s} {ms:8.2f} ms", flush=True)

    def run() -> None:
        for mod, x in plan:
            mod(x)

    record("base", _time_fn(run))
    res["lora_flop_fraction_r16"] = sum(
        16 * len(DIFFUSERS_PARTS[n.split(".", 2)[2]]) * i + 16 * o for n, _, i, o, _ in layers
    ) / sum(i * o for _, _, i, o, _ in layers)
    if kernels.available():  # the Triton GEMM alone, no adapter: how close to cuBLAS
        res["bf16_tiles"] = _sweep(
            res,
            "triton_base",
            BF16_TILES,
            lambda: [tk.lora_linear(x, m.weight, m.bias, None) for m, x in plan],
        )
    loras = {"r16": lp.load(stack_lora(layers, 16, 1)), "r64": lp.load(stack_lora(layers, 64, 2))}
    second = lp.load(stack_lora(layers, 16, 3))
    res["adapter_GB_r16"] = loras["r16"].parameters * 2 / 1e9
    for mode in _modes("float"):
        _mode(mode)
        if mode == "fused":  # flattened tile loop or not: timed with one LoRA, the best kept
            handle = lp.apply(root, loras["r16"])
            res["bf16_fused_tiles"] = _sweep(res, "loraplug_fused_r16", _flatten_variants(False), run)
            handle.remove()
        for key, adapters in (
            ("r16", loras["r16"]),
            ("r64", loras["r64"]),
            ("2x_r16", [loras["r16"], second]),
        ):
            before = torch.cuda.memory_allocated()
            handle = lp.apply(root, adapters)
            assert handle.report.ok, handle.report.unmatched
            record(f"loraplug_{mode}_{key}", _time_fn(run))
            res[f"loraplug_{mode}_{key}_added_GB"] = (torch.cuda.memory_allocated() - before) / 1e9
            handle.remove()
    _default_mode()
    res["check"] = _check_paths(root, layers[0][0], xs, loras["r16"], second)
    first, x0 = plan[0]
    handle = lp.apply(root, loras["r16"])
    dense = first(x0).float()
    handle.remove()
    # fp8 base: e4m3 weights per row, activations per token
    fp8_mod.quantize_fp8(root)
    plan = [(root.get_submodule(name), xs[(i, s)]) for name, _, i, _, s in layers]
    record("fp8_base", _time_fn(run))
    if kernels.available():

        def triton_fp8() -> None:
            for m, x in plan:
                tk.lora_linear(x, m.weight, m.bias, None, (None, m.weight_scale), x.dtype)

        res["fp8_tiles"] = _sweep(res, "triton_fp8_base", FP8_TILES, triton_fp8)
    for mode in _modes("fp8"):
        _mode(mode)
        handle = lp.apply(root, loras["r16"])
        if mode == "fused":
            res["fp8_fused_tiles"] = _sweep(res, "fp8_loraplug_fused_r16", _flatten_variants(True), run)
        record(f"fp8_loraplug_{mode}_r16", _time_fn(run))
        y = root.get_submodule(layers[0][0])(x0).float()
        res[f"fp8_loraplug_{mode}_rel_err_vs_bf16"] = ((y - dense).norm() / dense.norm()).item()
        handle.remove()
    _default_mode()
    for key in [k for k in res if k.endswith("_ms") and k != "base_ms"]:
        res[key.replace("_ms", "_ratio")] = round(res[key] / res["base_ms"], 4)
    out = Path(os.environ.get("OUT", ".")) / os.environ.get("NAME", "linear_stack.json")
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_ms")}, indent=1))
    return res


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for p in parents:
        if not hasattr(node, p):
            node.add_module(p, torch.nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, module)


def _check_paths(root, name: str, xs: dict, first, second) -> dict:
    """Relative error of the hooked order, the accumulating base GEMM (training, compiled graphs)
    and the fused kernel against float32, on one fused qkv layer."""
    from .runtime.bypass import runners

    mod = root.get_submodule(name)
    x = xs[(mod.in_features, "img")]
    if "fused" in _modes():
        _mode("fused")
    handle = lp.apply(root, [first, second], strength=[0.7, 1.2])
    _default_mode()
    runner, ref = runners(mod), _float_reference(mod, x)
    paths = {"hooked": runner._run(mod, (x,), {}, torch.nn.Linear.forward(mod, x))}
    if runner.accumulating:  # the order training and compiled graphs take
        with torch.enable_grad():
            paths["accumulated"] = runner._accumulated_output(mod, x.detach().requires_grad_()).detach()
    if runner.fused:
        paths["fused"] = runner._fused_output(mod, x)
    handle.remove()
    return {k: ((y.float() - ref).norm() / ref.norm()).item() for k, y in paths.items()}


def _float_reference(mod, x):
    """The module with its adapters, computed in float32 (portable path on float copies)."""
    from .runtime.bypass import runners

    runner = runners(mod)
    clone = torch.nn.Linear(mod.in_features, mod.out_features, device=x.device, dtype=torch.float32)
    clone.weight.copy_(mod.weight.float())
    clone.bias.copy_(mod.bias.float())
    y = clone(x.float())
    for e in runner.entries:
        down, up, scale = e.patch.low_rank(x.float())
        t = e.target
        size = mod.out_features if t.size is None else t.size
        y[:, t.offset : t.offset + size] += (
            (x.float() @ down.float().T) @ up.float().T * scale * e.strength.item()
        )
    return y


def table(results: dict) -> Table:
    """The ratios of a run (each against the base measured in that run) as a rich table."""
    t = Table(title=f"loraplug bench — {results.get('device', '?')}, torch {results.get('torch', '?')}")
    t.add_column("variant")
    t.add_column("ms", justify="right")
    t.add_column("ratio", justify="right")
    for key, value in results.items():
        if key.endswith("_ratio"):
            name = key.removesuffix("_ratio")
            t.add_row(name, f"{results.get(name + '_ms', float('nan')):.1f}", f"{value:.3f}")
    return t


def _modes(base: str | None = None) -> tuple[str, ...]:
    """hooked (adapters added after the base GEMM, no Triton: LORAPLUG_ACCUMULATE=0,
    LORAPLUG_KERNELS=0), portable (no Triton; a plain Linear's base GEMM accumulates into the
    adapters' output), and where Triton runs: hybrid (=base: Triton fp8 base GEMM, adapters on the
    portable path), shapes (=shapes: float bases fused on ``kernels.float_shape_fuses``'s shapes)
    and fused (=all: adapters inside the base GEMM on every base). The default is fused on fp8
    bases; on float ones shapes where that was measured faster (``kernels.FLOAT_SHAPES_GPUS``),
    portable elsewhere. ``MODES`` (space-separated) picks a subset. ``base`` ("float" or "fp8")
    leaves out the modes that run the same as another on that base (hybrid = portable on a float
    base; hooked = portable, shapes = the default on an fp8 base)."""
    from .runtime import kernels

    triton = ("hooked", "portable", "hybrid", "shapes", "fused")
    modes = triton if kernels.available() else ("hooked", "portable")
    chosen = os.environ.get("MODES", "").split()
    same = {"float": ("hybrid",), "fp8": ("hooked", "shapes")}.get(base, ())
    return tuple(m for m in modes if (not chosen or m in chosen) and m not in same)


def _mode(name: str) -> None:
    os.environ["LORAPLUG_KERNELS"] = {
        "hooked": "0",
        "portable": "0",
        "hybrid": "base",
        "shapes": "shapes",
        "fused": "all",
    }[name]
    os.environ["LORAPLUG_ACCUMULATE"] = "0" if name == "hooked" else "1"


def _default_mode() -> None:
    os.environ.pop("LORAPLUG_KERNELS", None)
    os.environ.pop("LORAPLUG_ACCUMULATE", None)


def _compile(model):
    """torch.compile with COMPILE_MODE (e.g. reduce-overhead: CUDA graphs, no host cost per launch);
    Dynamo's counters start from zero (``_graphs`` reads them)."""
    from torch._dynamo.utils import counters

    counters.clear()
    return torch.compile(model, mode=os.environ.get("COMPILE_MODE") or None)


def _graphs() -> dict:
    """What Dynamo made of the model since ``_compile``: graphs, graph breaks (and their first
    reasons), recompilations — a compiled model split into many graphs runs far slower."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(breaks.values()),
        "break_reasons": [reason[:160] for reason in list(breaks)[:3]],
        "recompiles": counters["recompiles"].get("total", 0) if "recompiles" in counters else 0,
    }


def main() -> None:
    from diffusers import FluxTransformer2DModel

    from .fp8 import quantize_fp8

    b = Bench()
    torch.manual_seed(0)
    with torch.device(DEV):
        model = FluxTransformer2DModel(**CFG).to(DT).eval().requires_grad_(False)
    b.time(model, "base")
    loras = {r: lp.load(diffusers_lora(model, r, seed=r)) for r in (16, 64)}
    second = lp.load(diffusers_lora(model, 16, seed=99))
    for layout in ("split", "fused") if os.environ.get("EAGER", "1") == "1" else ():
        if layout == "fused":
            model.fuse_qkv_projections()
            b.res["fused_shared_GB"] = share_fused_weights(model) / 1e9
            b.time(model, "base_fused")
        b.memory(f"{layout}_base")
        for mode in _modes("float"):
            _mode(mode)
            for key, adapters in (("r16", loras[16]), ("r64", loras[64]), ("2x_r16", [loras[16], second])):
                handle = lp.apply(model, adapters, strength=[1.0, 0.8] if key == "2x_r16" else 1.0)
                assert handle.report.ok, handle.report.unmatched
                b.time(model, f"loraplug_{mode}_{layout}_{key}")
                b.memory(f"{mode}_{layout}_{key}")
                handle.remove()
        _default_mode()
        merged = lp.merge(model, loras[16])
        b.time(model, f"merged_{layout}_r16")
        merged.remove()
    b.res["adapter_GB_r16"] = loras[16].parameters * 2 / 1e9
    if os.environ.get("EAGER", "1") != "1":
        model.fuse_qkv_projections()
        b.res["fused_shared_GB"] = share_fused_weights(model) / 1e9
    compile_ = os.environ.get("COMPILE") == "1"
    if compile_:
        t0 = time.time()
        b.time(_compile(model), "compiled_base_fused")
        b.res["compiled_base_fused_dynamo"] = _graphs()
        b.res["compile_base_s"] = time.time() - t0
        for mode in _modes("float") if os.environ.get("COMPILE_LORA", "1") == "1" else ():
            _mode(mode)
            handle = lp.apply(model, loras[16])
            torch._dynamo.reset()
            compiled = _compile(model)
            b.time(compiled, f"compiled_loraplug_{mode}_fused_r16")
            b.res[f"compiled_loraplug_{mode}_fused_r16_dynamo"] = _graphs()
            with torch._dynamo.config.patch(error_on_recompile=True):
                for s in (0.2, 1.3):
                    handle.set_strength(s)
                    b.time(compiled, f"compiled_loraplug_{mode}_fused_r16_s{s}")
            b.res[f"compiled_{mode}_no_recompile_on_strength"] = True
            handle.remove()
        _default_mode()
        torch._dynamo.reset()
    if os.environ.get("FP8") == "1":  # fp8 base: the blocks' linear layers, per row / per token
        quantize_fp8(model, targets=r"blocks\.")
        b.time(model, "fp8_base")
        for mode in _modes("fp8"):
            _mode(mode)
            handle = lp.apply(model, loras[16])
            b.time(model, f"fp8_loraplug_{mode}_r16")
            handle.remove()
        _default_mode()
        if compile_:
            b.time(_compile(model), "compiled_fp8_base")
            b.res["compiled_fp8_base_dynamo"] = _graphs()
            handle = lp.apply(model, loras[16])
            torch._dynamo.reset()
            b.time(_compile(model), "compiled_fp8_loraplug_r16")
            b.res["compiled_fp8_loraplug_r16_dynamo"] = _graphs()
            handle.remove()
    if os.environ.get("PEFT", "1") == "1" and os.environ.get("FP8") != "1":
        from peft import LoraConfig  # last: PEFT leaves its wrappers in the model

        try:
            model.unfuse_qkv_projections()
            names = [t.split(".", 1)[1] if t.startswith("attn.") else t for t in TARGETS]
            model.add_adapter(
                LoraConfig(r=16, lora_alpha=16, target_modules=names, init_lora_weights=False), "p"
            )
            b.time(model, "peft_r16")
            model.add_adapter(
                LoraConfig(r=16, lora_alpha=16, target_modules=names, init_lora_weights=False), "q"
            )
            model.set_adapters(["p", "q"], [1.0, 0.8])
            b.time(model, "peft_2x_r16")
        except Exception as err:  # PEFT is a reference here, not the subject
            b.res["peft_error"] = f"{type(err).__name__}: {err}"[:300]
    base = b.res["base_ms"]
    for key in [k for k in b.res if k.endswith("_ms") and k != "base_ms"]:
        ref = (
            b.res["compiled_base_fused_ms"]
            if key.startswith("compiled_") and "compiled_base_fused_ms" in b.res
            else base
        )
        b.res[key.replace("_ms", "_ratio")] = round(b.res[key] / ref, 4)
    out = Path(os.environ.get("OUT", ".")) / os.environ.get("NAME", "flux_bench.json")
    out.write_text(json.dumps(b.res, indent=1))
    print(json.dumps({k: v for k, v in b.res.items() if k.endswith("_ratio")}, indent=1))


if __name__ == "__main__":
    main()
