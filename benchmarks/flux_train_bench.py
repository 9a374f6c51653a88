"""GPU training benchmark: one step on the full Flux-dev-size transformer (random weights, bf16,
512x512 = 1024 image + 512 text tokens, batch 1, fused AdamW as lp.train uses on CUDA, for every variant), ratios to the frozen forward+backward
measured in the same run: PEFT LoRA r16 (split layout) vs loraplug bypass r16 on the split layout
(split_hooked: adapters added after the base GEMM, the previous default; *_bf16*: bf16
adapters, as diffusers' add_adapter gives PEFT; *_save_memory: as ``lp.train(save_memory=True)``,
selective activation checkpointing per block; split_combo: compiled with Inductor's combo kernels), the fused layout (one
adapter per q/k/v slice; ``*_kernels``: with the training kernels; ``*_autograd``: autograd through
the separate GEMMs, ``LORAPLUG_TRAIN_GEMM=0``) and an fp8 base (``lp.quantize_fp8``), peak memory of each (``LAYOUTS``
picks; ``COMPILED_ONLY=fp8`` skips a layout's eager step; ``REGIONAL=1`` compiles each transformer block
(lp.train's ``regional=True``: one compile per block kind, minutes less at full depth)
instead of the whole model; ``PROFILE=1`` adds each step's device
time by kernel kind); with COMPILE=1 also the layouts in
COMPILE_LAYOUTS (default split and fp8) and (``FROZEN_COMPILED=0`` skips it) the frozen model under torch.compile. Writes
$OUT/flux_train_bench.json, and after every variant flux_train_bench.partial.json."""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import loraplug as lp  # noqa: E402
from loraplug.bench import CFG, TARGETS, _graphs, _time_fn, inputs, recompute_reshaping  # noqa: E402
from loraplug.train import _compile, keep_or_recompute, saving_memory  # noqa: E402  (what lp.train(compile=, regional=, save_memory=) runs)

DEV, DT = "cuda", torch.bfloat16
ITERS = int(os.environ.get("ITERS", 6))
REGIONAL = os.environ.get("REGIONAL") == "1"  # compile block by block, as lp.train(regional=True)
T_IMG = 1024  # a 512² image (and 512 text tokens)
torch.backends.cuda.enable_cudnn_sdp(False)  # its backward failed on torch 2.11 there (anchors)
res = {
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "blocks": [CFG["num_layers"], CFG["num_single_layers"]],
    "regional_compile": REGIONAL,
}
INP = inputs(image_tokens=T_IMG, device=DEV)
g = torch.Generator(device=DEV).manual_seed(1)
TARGET = torch.randn(1, T_IMG, 64, device=DEV, dtype=DT, generator=g)
COMPILE_LAYOUTS = os.environ.get("COMPILE_LAYOUTS", "split fp8").split()  # with COMPILE=1


def build():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        model = FluxTransformer2DModel(**CFG)
    return model.to(DT).requires_grad_(False).train()


def time_steps(model, params, name, input_grad=False):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None  # as lp.train on CUDA
    x = INP["hidden_states"].clone().requires_grad_(input_grad)

    stamps = []  # host time of each phase per call (no synchronization added)

    def step():
        t0 = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (no-op otherwise)
        x.grad = None  # the frozen step's input gradient: not accumulated into graph memory
        out = model(**{**INP, "hidden_states": x})[0]
        t1 = time.perf_counter()
        (out.float() - TARGET.float()).pow(2).mean().backward()
        t2 = time.perf_counter()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        stamps.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    step()  # the optimizer's state exists from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stamps.clear()
    res[name + "_ms"] = _time_fn(step, ITERS)
    # where the host spends a step: a wall time near the host's total is host-bound
    res[name + "_host_ms"] = {
        phase: round(statistics.median(s[i] for s in stamps) * 1e3, 2)
        for i, phase in enumerate(("forward", "backward", "optimizer"))
    }
    res[name + "_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    if os.environ.get("PROFILE") == "1":  # device time by kernel kind vs the step's wall time
        from profile_flux import device_profile

        res[name + "_profile"] = device_profile(step)
    print(f"{name:24s} {res[name + '_ms']:8.1f} ms  peak {res[name + '_peak_GB']:.1f} GB", flush=True)
    (Path(os.environ.get("OUT", ".")) / "flux_train_bench.partial.json").write_text(json.dumps(res, indent=1))


def summarize(res: dict) -> None:
    """Add the ratios to ``res``: each step against the frozen one (eager, and compiled the same
    way: wall and device time), the fp8 steps against PEFT's, every peak against PEFT's."""
    times = [k for k, v in res.items() if k.endswith("_ms") and isinstance(v, float)]  # not *_host_ms
    for key in times:
        res[key.replace("_ms", "_ratio")] = round(res[key] / res["frozen_fwd_bwd_ms"], 4)
    if "frozen_fwd_bwd_compiled_ms" in res:
        for layout in COMPILE_LAYOUTS:
            if f"loraplug_{layout}_r16_step_compiled_ms" in res:
                res[f"loraplug_{layout}_compiled_vs_frozen_compiled"] = round(
                    res[f"loraplug_{layout}_r16_step_compiled_ms"] / res["frozen_fwd_bwd_compiled_ms"], 4
                )
                profiles = [res.get(f"{k}_profile") for k in (f"loraplug_{layout}_r16_step_compiled", "frozen_fwd_bwd_compiled")]  # fmt: skip
                if all(profiles):  # device time: steady where the wall time is host noise (session 19)
                    res[f"loraplug_{layout}_compiled_vs_frozen_compiled_device"] = round(
                        profiles[0]["device_total"] / profiles[1]["device_total"], 4
                    )
    for key in [k for k in times if k.startswith("loraplug_fp8_r16_step")]:
        res[key.replace("_ms", "_vs_peft_step")] = round(res[key] / res["peft_r16_step_ms"], 4)
    for key in [k for k in res if k.startswith("loraplug_") and k.endswith("_peak_GB")]:  # eager and compiled
        res[key.replace("_peak_GB", "_vs_peft_peak_memory")] = round(
            res[key] / res["peft_r16_step_peak_GB"], 4
        )


def main():
    from peft import LoraConfig

    model = build()
    time_steps(model, [], "frozen_fwd_bwd", input_grad=True)
    model.add_adapter(
        LoraConfig(r=16, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights="gaussian"), "a"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    res["peft_trainable_M"] = sum(p.numel() for p in params) / 1e6
    time_steps(model, params, "peft_r16_step")
    del model, params
    torch.cuda.empty_cache()
    layouts = os.environ.get("LAYOUTS", "split split_bf16 split_hooked fused fp8").split()
    for layout in layouts:  # fused: diffusers keeps the split weights too (+ memory)
        model = build()
        if layout.startswith("fused"):  # one copy of the q/k/v weights (diffusers keeps the split ones)
            model.fuse_qkv_projections()
            res["fused_shared_GB"] = lp.share_fused_weights(model) / 1e9
        if layout.endswith("_kernels"):  # the training kernels (runtime.train_kernels), opt-in
            os.environ["LORAPLUG_TRAIN_KERNELS"] = "1"
        if layout.endswith("_autograd"):  # autograd through the separate GEMMs (before session 13)
            os.environ["LORAPLUG_TRAIN_GEMM"] = "0"
        if layout == "fp8":  # the blocks' linear layers in fp8 (per-row weights, per-token activations)
            lp.quantize_fp8(model, targets=r"blocks\.")
            torch.cuda.empty_cache()
        if layout == "split_hooked":  # adapters added after the base GEMM (the previous default)
            os.environ["LORAPLUG_ACCUMULATE"] = "0"
        dtype = torch.bfloat16 if "_bf16" in layout else torch.float32  # bf16: PEFT's, via diffusers
        handle = lp.create(model, "lora", rank=16, alpha=16, targets="attn+mlp", init="random", dtype=dtype)
        params = handle.parameters()
        res["loraplug_trainable_M"] = sum(p.numel() for p in params) / 1e6
        if layout not in os.environ.get("COMPILED_ONLY", "").split():
            time_steps(model, params, f"loraplug_{layout}_r16_step")
        if layout in COMPILE_LAYOUTS and os.environ.get("COMPILE") == "1":  # as lp.train(compile=True)
            mode = os.environ.get("COMPILE_MODE") or None  # reduce-overhead: CUDA graphs
            torch._dynamo.utils.counters.clear()
            compiled = _compile(model, mode, REGIONAL)
            t0 = time.time()
            # split_combo: Inductor's combo kernels (independent small kernels, e.g. the adapters'
            # casts, launched as one)
            # *_save_memory: as lp.train(save_memory=True) runs it (selective activation
            # checkpointing per block: cheap elementwise tensors recomputed in the backward);
            # *_reshaping: only reshaping, concatenations and activations recomputed (a probe)
            reshaping = layout.endswith("_reshaping")
            with (
                torch._inductor.config.patch(combo_kernels=layout.endswith("_combo")),
                saving_memory(
                    model,
                    layout.endswith("_save_memory") or reshaping,
                    recompute_reshaping if reshaping else keep_or_recompute,
                ),
            ):
                time_steps(model, params, f"loraplug_{layout}_r16_step_compiled")
            res[f"loraplug_{layout}_compile_and_time_s"] = round(time.time() - t0, 1)
            res[f"loraplug_{layout}_r16_step_compiled_dynamo"] = _graphs()
            if "frozen_fwd_bwd_compiled_ms" not in res and os.environ.get("FROZEN_COMPILED", "1") == "1":
                handle.remove()
                torch._dynamo.reset()
                _compile(model, mode, REGIONAL)  # the same mode: the ratio compares like with like
                time_steps(model, [], "frozen_fwd_bwd_compiled", input_grad=True)
            for module in compiled:  # back to the eager modules
                module._compiled_call_impl = None
        os.environ.pop("LORAPLUG_ACCUMULATE", None)
        os.environ.pop("LORAPLUG_TRAIN_KERNELS", None)
        os.environ.pop("LORAPLUG_TRAIN_GEMM", None)
        del model, params, handle
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    summarize(res)
    out = Path(os.environ.get("OUT", ".")) / "flux_train_bench.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if "ratio" in k or "M" in k or "memory" in k}, indent=1))


if __name__ == "__main__":
    main()
