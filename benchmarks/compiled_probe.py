"""Where a forward's time goes, at reduced depth (``ND``/``NS`` blocks, default 4 + 8, so that each
compile takes seconds, not minutes): the bf16 base and + loraplug LoRA r16 (portable; with the
base GEMM accumulating into the adapters' output; the fused Triton kernel, ``LORAPLUG_KERNELS=all``,
or only on the shapes ``kernels.float_shape_fuses`` picks, ``_shapes``; two LoRAs), loraplug's fp8 base (``quantize_fp8``, the blocks' projections; on the Triton kernels, in compiled graphs too from Hopper on; ``fp8_base_scaled_mm``: ``torch._scaled_mm``, ``LORAPLUG_KERNELS=0``, the compiled default before session 23) and fp8 + LoRA r16
(the default: the fused kernel; with the adapters on the portable path, ``=base``; without the
narrow tiles for few output tiles, ``_wide``; captured without the down projection beside the
quantization, ``_serial``; with Triton's warp specialization, ``_ws``: ``WS_TILES_BF16`` /
``WS_TILES_FP8`` pick its tiles; the narrow tiles flattened, not warp-specialized (the default
before session 9), ``_narrow_flat``; TMA descriptors made by the host, ``_host_desc``), a
K-concatenation LoRA (``KConcat``: one GEMM over ``[x | s·x·Aᵀ]`` and ``[W | B]``), and
(``REFERENCE=0`` skips it) a reference fp8 layer written out below (the arithmetic of
``shared/anchors/flux_fp8_gpu.py``: e4m3 per row, per-token activations, ``torch._scaled_mm``)
with a reference grouped LoRA hook. Each variant eager, under torch.compile
and under CUDA graphs (``GRAPHS=0`` skips those; ``AUTOTUNE=1`` adds ``mode="max-autotune"``): median time, Dynamo's counts, device time by
kind against the wall time (device time well under wall: the host sets the pace), the top
kernels. Ratios against the bf16 base of the same mode. ``VARIANTS`` (space-separated keys such
as ``bf16_base_graphs fp8_lora_r16_graphs``; name the base for the ratios) runs only those.
Writes $OUT/compiled_probe.json (``NAME`` renames it) after every variant.

    ND=4 NS=8 OUT=results python benchmarks/compiled_probe.py     # GPU machine
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("ND", "4")
os.environ.setdefault("NS", "8")

from profile_flux import device_profile  # noqa: E402

import loraplug as lp  # noqa: E402
from loraplug.bench import CFG, DEV, DT, _graphs, _time_fn, diffusers_lora, inputs  # noqa: E402
from loraplug.fp8 import quantize_fp8  # noqa: E402
from loraplug.runtime import bypass, kernels  # noqa: E402

E4M3 = torch.float8_e4m3fn
OUT = Path(os.environ.get("OUT", "."))
RES: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ND": CFG["num_layers"],
             "NS": CFG["num_single_layers"]}  # fmt: skip
INP = inputs()
NOT_NORM = r"blocks\.\d+\.(?!norm)"  # the blocks' projections; not the modulation (norm*.linear)


class ReferenceFp8(nn.Module):
    """The anchors' fp8 layer: per-row weight scales, dynamic per-token activation scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(E4M3).max
        self.register_buffer("wq", (w / scale).to(E4M3))
        self.register_buffer("ws", scale.t().contiguous())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(E4M3).max
        y = torch._scaled_mm((x2 / xs).to(E4M3), self.wq.t(), scale_a=xs, scale_b=self.ws, out_dtype=x.dtype)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], -1)


def reference_fp8(model: nn.Module) -> None:
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}"
            if isinstance(child, nn.Linear) and "blocks." in full and "norm" not in full:
                setattr(parent, name, ReferenceFp8(child))


def _reference_pair(mod: nn.Module, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One down and one block-diagonal up projection (q/k/v slices of a fused qkv)."""
    parts = 3 if name.endswith("to_qkv") or name.endswith("to_added_qkv") else 1
    down = torch.randn(rank * parts, mod.in_features, device=DEV, dtype=DT) * 0.01
    up = torch.zeros(mod.out_features, rank * parts, device=DEV, dtype=DT)
    size = mod.out_features // parts
    for i in range(parts):
        up[i * size : (i + 1) * size, i * rank : (i + 1) * rank] = 0.01
    return down, up


def reference_lora_hooks(model: nn.Module, rank: int = 16) -> list:
    """One down and one block-diagonal up projection per layer (q/k/v slices of a fused qkv),
    added in place after the base: the anchors' grouped prototype."""
    hooks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, ReferenceFp8)) or "blocks." not in name or "norm" in name:
            continue
        down, up = _reference_pair(mod, name, rank)

        def add(mod, args, y, down=down, up=up):
            x = args[0]
            return y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ down.T, up.T).view_as(y)

        hooks.append(mod.register_forward_hook(add))
    return hooks


class KConcat(nn.Module):
    """A LoRA beside a bf16 Linear as one GEMM: y = [x | s·x·Aᵀ] · [W | B]ᵀ. The weight is stored
    once as the left columns of an (out, in + rank) buffer whose right columns hold B, so the
    base layer's own weight is a strided view of it (no second copy of W)."""

    def __init__(self, linear: nn.Linear, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        buf = torch.empty(linear.out_features, linear.in_features + down.shape[0], device=DEV, dtype=DT)
        buf[:, : linear.in_features] = linear.weight
        buf[:, linear.in_features :] = up
        self.register_buffer("buf", buf)
        self.register_buffer("down", down)
        self.register_buffer("scale", torch.ones(down.shape[0], device=DEV, dtype=DT))
        self.bias = linear.bias

    def forward(self, x):
        h = torch.mm(x.reshape(-1, x.shape[-1]), self.down.t()) * self.scale
        return nn.functional.linear(torch.cat([x, h.view(*x.shape[:-1], -1)], -1), self.buf, self.bias)


def kconcat_lora(model: nn.Module, rank: int = 16) -> None:
    """The reference LoRA of ``reference_lora_hooks`` as K-concatenation where in ≤ out (q/k/v,
    the MLP's up projections, linear1), as an out-of-place add after the base elsewhere."""
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or "blocks." not in name or "norm" in name:
            continue
        down, up = _reference_pair(mod, name, rank)
        if mod.in_features <= mod.out_features:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, KConcat(mod, down, up))
        else:
            mod.register_forward_hook(
                lambda mod, args, y, down=down, up=up: y + (args[0] @ down.T @ up.T).view_as(y)
            )


def save() -> None:
    """Write what was measured so far ($OUT/compiled_probe.json, ``NAME`` renames it)."""
    (OUT / os.environ.get("NAME", "compiled_probe.json")).write_text(json.dumps(RES, indent=1))


def variant_key(name: str, mode: str | None) -> str:
    """``name`` with the mode's suffix: ``_eager``, ``_compiled``, ``_graphs``, ``_autotune``."""
    return f"{name}_{ {None: 'compiled', 'eager': 'eager', 'max-autotune': 'autotune'}.get(mode, 'graphs') }"


def wanted(key: str) -> bool:
    """Whether ``VARIANTS`` (unset: every variant) names this variant."""
    chosen = os.environ.get("VARIANTS", "").split()
    return not chosen or key in chosen


def measure(model, name: str, mode: str | None) -> None:
    """``mode``: None (torch.compile), "reduce-overhead" (CUDA graphs), "max-autotune" (Inductor's
    GEMM templates, timed against cuBLAS per shape, and CUDA graphs) or "eager"."""
    key = variant_key(name, mode)
    if not wanted(key):
        return
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model if mode == "eager" else torch.compile(model, mode=mode)
    try:
        with torch.no_grad():
            RES[key + "_ms"] = _time_fn(lambda: compiled(**INP), warmup=3)
        RES[key + "_dynamo"] = _graphs()
        with torch.no_grad():
            RES[key + "_profile"] = device_profile(lambda: compiled(**INP))
        print(
            f"{key:40s} {RES[key + '_ms']:8.2f} ms  device {RES[key + '_profile']['device_total']:8.2f}",
            flush=True,
        )
    except Exception as err:  # a variant that fails is recorded, the others still run
        RES[key + "_error"] = f"{type(err).__name__}: {err}"[:400]
        print(key, RES[key + "_error"], flush=True)
    base = RES.get(f"bf16_base_{key.rpartition('_')[2]}_ms")
    if base and key + "_ms" in RES:
        RES[key + "_ratio"] = round(RES[key + "_ms"] / base, 4)
    save()


@contextlib.contextmanager
def env(name: str, value: str):
    """An environment switch (``LORAPLUG_KERNELS``, ``LORAPLUG_ACCUMULATE``) while applying and
    measuring."""
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name)


@contextlib.contextmanager
def configs(**entries):
    """``kernels.CONFIGS`` entries replaced while measuring."""
    kept = dict(kernels.CONFIGS)
    kernels.CONFIGS.update(entries)
    try:
        yield
    finally:
        kernels.CONFIGS.clear()
        kernels.CONFIGS.update(kept)


def scaling_the_hidden_activation(model) -> None:
    """Eager inference as before session 25, for a same-process comparison: the groups built (one
    call), then their run alphas dropped, so that each layer scales x·Aᵀ per rank before the up GEMM."""
    with torch.no_grad():
        model(**INP)
    for module in model.modules():
        runner = bypass.runners(module)
        for group in runner._lowrank.values() if runner else ():
            group.run_alphas = None


def measure_applied(model, adapters, name: str, mode: str | None, prepare=None, **apply_kwargs) -> None:
    """``measure`` with ``adapters`` applied (then ``prepare(model)``), removed afterwards; the GPU
    memory the applied adapters hold after the timed calls (their caches; the sets themselves stay
    on the CPU, as loaded from a file) against the adapters' own bytes
    (``_added_memory_vs_adapters``)."""
    key = variant_key(name, mode)
    if not wanted(key):
        return
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    handle = lp.apply(model, adapters, **apply_kwargs)
    if prepare is not None:
        prepare(model)
    measure(model, name, mode)
    torch.cuda.synchronize()
    if key + "_ms" in RES:
        sets = adapters if isinstance(adapters, list) else [adapters]
        own = sum(
            t.numel() * t.element_size()
            for s in sets
            for a in s.adapters.values()
            for t in a.tensors.values()
        )
        RES[key + "_added_memory_vs_adapters"] = round((torch.cuda.memory_allocated() - before) / own, 4)
        save()
    handle.remove()


def warp_specialized(kind: str) -> kernels.Tiles:
    """The default configuration of ``kind`` with Triton's warp specialization of the tile loop
    (``WS_TILES_BF16`` / ``WS_TILES_FP8`` = "bm,bn,bk,warps,stages" override the tiles)."""
    tiles = kernels.config(kind == "fp8")
    if os.environ.get("WS_TILES_" + kind.upper()):
        bm, bn, bk, warps, stages = map(int, os.environ["WS_TILES_" + kind.upper()].split(","))
        tiles = tiles._replace(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages)
    return tiles._replace(flatten=False, ws=True)


def build() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        model = FluxTransformer2DModel(**CFG).to(DT).eval().requires_grad_(False)
    model.fuse_qkv_projections()
    return model


def main() -> None:
    modes = ["eager", None] + (["reduce-overhead"] if os.environ.get("GRAPHS", "1") == "1" else [])
    modes += ["max-autotune"] if os.environ.get("AUTOTUNE") == "1" else []
    model = build()
    # on the CPU, as read from a file: what the GPU holds is then loraplug's own
    lora = lp.load({k: v.cpu() for k, v in diffusers_lora(model, 16, seed=16).items()})
    second = lp.load({k: v.cpu() for k, v in diffusers_lora(model, 16, seed=99).items()})
    for mode in modes:
        measure(model, "bf16_base", mode)
        with env("LORAPLUG_KERNELS", "fp8"):  # the portable path (the default on an H100 is _shapes)
            measure_applied(model, lora, "bf16_lora_r16", mode)
            measure_applied(model, [lora, second], "bf16_lora_2x_r16", mode, strength=[1.0, 0.8])
            if mode == "eager":  # the strength as the up GEMM's alpha (session 25) against a pass over x·Aᵀ
                measure_applied(
                    model, lora, "bf16_lora_r16_scaled_hidden", mode, scaling_the_hidden_activation
                )
        with env("LORAPLUG_KERNELS", "all"):  # the Triton GEMM with the LoRA tail, on the bf16 base
            measure_applied(model, lora, "bf16_lora_r16_fused", mode)
            with configs(bf16=warp_specialized("bf16")):
                measure_applied(model, lora, "bf16_lora_r16_fused_ws", mode)
        with env("LORAPLUG_KERNELS", "shapes"):  # the fused kernel on the short-reduction shapes only
            measure_applied(model, lora, "bf16_lora_r16_shapes", mode)
            with configs(bf16=warp_specialized("bf16")):
                measure_applied(model, lora, "bf16_lora_r16_shapes_ws", mode)
            measure_applied(model, [lora, second], "bf16_lora_2x_r16_shapes", mode, strength=[1.0, 0.8])
    with env("LORAPLUG_ACCUMULATE", "all"), env("LORAPLUG_KERNELS", "fp8"):  # portable, the base GEMM
        measure_applied(model, lora, "bf16_lora_r16_accumulating", None)  # accumulating into the adapters
    quantize_fp8(model, targets=NOT_NORM)
    for mode in modes:
        measure(model, "fp8_base", mode)
        with env("LORAPLUG_KERNELS", "0"):  # no Triton: torch._scaled_mm, the quantization fused by Inductor
            measure(model, "fp8_base_scaled_mm", mode)
        measure_applied(model, lora, "fp8_lora_r16", mode)
        with env(
            "LORAPLUG_KERNELS", "base"
        ):  # adapters on the portable path (the compiled default before s6)
            measure_applied(model, lora, "fp8_lora_r16_portable", mode)
        with configs(fp8=warp_specialized("fp8")):
            measure_applied(model, lora, "fp8_lora_r16_ws", mode)
        narrow = kernels.Tiles(*kernels.CONFIGS["fp8_narrow"])
        with configs(fp8_narrow=narrow._replace(flatten=True, ws=False)):  # session 8's text-stream tiles
            measure_applied(model, lora, "fp8_lora_r16_narrow_flat", mode)
        host = {
            k: kernels.Tiles(*kernels.CONFIGS[k])._replace(device_desc=False) for k in ("fp8", "fp8_narrow")
        }
        with configs(**host):  # TMA descriptors encoded by the host (baked into a captured graph)
            measure_applied(model, lora, "fp8_lora_r16_host_desc", mode)
        from loraplug.runtime import triton_kernels

        with configs(fp8_narrow=None):  # no narrow tiles for the text stream's few output tiles
            measure_applied(model, lora, "fp8_lora_r16_wide", mode)
        triton_kernels.DOWN_BESIDE_QUANTIZATION = False  # captured graphs: quantization, then down projection
        measure_applied(model, lora, "fp8_lora_r16_serial", mode)
        triton_kernels.DOWN_BESIDE_QUANTIZATION = True
    if any(k.startswith("kconcat") for k in os.environ.get("VARIANTS", "kconcat").split()):
        model = None
        torch.cuda.empty_cache()
        concat = build()
        kconcat_lora(concat)
        for mode in modes:
            measure(concat, "kconcat_lora_r16", mode)
    if os.environ.get("REFERENCE", "1") == "1":
        model = concat = None
        torch.cuda.empty_cache()
        reference = build()
        reference_fp8(reference)
        measure(reference, "reference_fp8_base", None)
        hooks = reference_lora_hooks(reference)
        measure(reference, "reference_fp8_lora_r16", None)
        for hook in hooks:
            hook.remove()
    print(json.dumps({k: v for k, v in RES.items() if k.endswith("_ratio")}, indent=1))


if __name__ == "__main__":
    main()
