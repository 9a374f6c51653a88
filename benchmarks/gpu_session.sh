#!/usr/bin/env bash
# Everything the GPU machine should run in one call, each step under its own time limit, results
# under $OUT (the device tool copies them back). Carry .whl/ with the diffusers (+ rich) wheels.
#   bash benchmarks/gpu_session.sh            # ~10 min: tests, linear stack, parts, eager, training
#   STEPS="compile" bash benchmarks/gpu_session.sh   # the torch.compile runs (~8 min)
#   STEPS="eager_portable train_compiled" …          # hooked vs accumulating portable path; compiled training
#   STEPS="compile_graphs" / "train_graphs" …        # the same under CUDA graphs (one device call each)
#   STEPS="probe train_small" …   # 4 + 8 blocks: compiled forward by kernel (+ CUDA graphs), training
#   STEPS="probe_full" …          # the compiled variants that matter, at Flux-dev depth (one call)
#   STEPS="probe_fp8" …           # fp8 + LoRA with and without the narrow tiles (2 + 4 blocks)
#   STEPS="fp8_target" …          # full depth (ND, NS: fewer blocks): fp8 + LoRA under CUDA graphs vs the compiled bf16 base (VARIANTS: others)
#   STEPS="bf16_shapes" …         # full depth: LORAPLUG_KERNELS=shapes against portable (1 and 2 LoRAs), eager + compiled, + added memory
#   STEPS="train_full" …         # full depth, blocks compiled one by one, CUDA graphs: LoRA step vs frozen
#   STEPS="train_layer" …        # one layer's training step per Flux-dev shape: frozen / portable / training kernels (device time)
#   STEPS="train_kernels" …      # full depth, CUDA graphs: the training kernels (fused q/k/v, split) against the portable path
#   STEPS="train_onecall" …      # full depth, CUDA graphs, fused layout: the one-call training GEMMs (default) against autograd's
#   STEPS="train_autotune" …     # the same, compiled with mode="max-autotune" (Inductor's GEMM templates, CUDA graphs)
#   STEPS="autotune" …           # full depth inference: max-autotune vs CUDA graphs, base and LoRA r16
#   STEPS="kconcat" …           # one LoRA training step's GEMMs per Flux-dev shape: shipped one call vs the K-concatenation (CUDA graphs)
#   STEPS="wsprobe" …            # warp-specialized tiles on and off against float32, fp8/bf16 × tokens × rank (16, 8, 4, none)
#   STEPS="fused_tests" …        # only tests/gpu/test_fused.py (the fused kernel)
#   STEPS="tiles" …               # the fused GEMM per tile configuration on every Flux-dev layer shape
#   STEPS="host" …                # host time per call of each path on a tiny layer (launch costs)
set -uo pipefail
OUT="${OUT:-results}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  # once per machine for these wheels (tail_variants.sh calls this script once per step)
  if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$(ls .whl/*.whl)" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
      && ls .whl/*.whl > /tmp/site/.wheels
  fi
  export PYTHONPATH="/tmp/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi
export OUT
# BUDGET (seconds, optional): no step runs past it (the device tool stops a call at 600 s)
START=$(date +%s)
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${BUDGET:-}" ]; then local left=$((BUDGET - $(date +%s) + START)); [ "$left" -lt "$limit" ] && limit=$left; fi
  echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? $(tail -1 "$OUT/$name.log")"
}
for s in ${STEPS:-tests linear parts profile eager train}; do
  case $s in
    tests) step gpu_tests 240 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/gpu ;;
    linear) step linear_stack 200 python3 benchmarks/linear_stack.py ;;
    parts) step kernel_parts 100 python3 benchmarks/kernel_parts.py ;;
    tiles) step tile_sweep 120 python3 benchmarks/tile_sweep.py ;;
    profile) step profile_flux 200 python3 benchmarks/profile_flux.py ;;
    host) HOST_ONLY=1 step host_cost 120 python3 benchmarks/profile_flux.py ;;
    eager) NAME=flux_eager.json FP8=1 PEFT=0 COMPILE=0 step flux_eager 240 python3 benchmarks/flux_bench.py ;;
    eager_portable) NAME=flux_eager_portable.json MODES="hooked portable" FP8=0 PEFT=0 COMPILE=0 step flux_eager_portable 200 python3 benchmarks/flux_bench.py ;;
    train) step flux_train 200 python3 benchmarks/flux_train_bench.py ;;
    train_compiled) LAYOUTS="${LAYOUTS:-split fp8}" COMPILE=1 step flux_train_compiled "${TRAIN_LIMIT:-420}" python3 benchmarks/flux_train_bench.py ;;
    train_graphs) LAYOUTS="${LAYOUTS:-split fp8}" COMPILE=1 COMPILE_MODE=reduce-overhead FROZEN_COMPILED=0 step flux_train_graphs "${TRAIN_LIMIT:-420}" python3 benchmarks/flux_train_bench.py ;;
    compile_fp8) NAME=flux_compiled_fp8.json EAGER=0 FP8=1 PEFT=0 COMPILE=1 COMPILE_LORA=0 step flux_compiled_fp8 330 python3 benchmarks/flux_bench.py ;;
    compile_graphs) NAME=flux_compiled_graphs.json MODES="${MODES:-portable}" COMPILE_MODE=reduce-overhead EAGER=0 FP8=1 PEFT=0 COMPILE=1 step flux_compiled_graphs 450 python3 benchmarks/flux_bench.py ;;
    probe) step compiled_probe "${PROBE_LIMIT:-330}" python3 benchmarks/compiled_probe.py ;;
    probe_fp8) ND=2 NS=4 REFERENCE=0 VARIANTS="bf16_base_eager bf16_base_compiled bf16_base_graphs fp8_base_compiled $(for v in fp8_lora_r16 fp8_lora_r16_wide; do echo ${v}_eager ${v}_compiled ${v}_graphs; done)" step compiled_probe_fp8 "${PROBE_LIMIT:-330}" python3 benchmarks/compiled_probe.py ;;
    probe_full) ND=19 NS=38 REFERENCE=0 VARIANTS="${VARIANTS:-bf16_base_compiled bf16_lora_r16_compiled fp8_base_compiled fp8_lora_r16_compiled fp8_lora_r16_portable_compiled}" step compiled_probe_full "${PROBE_LIMIT:-560}" python3 benchmarks/compiled_probe.py ;;
    fp8_target) NAME=fp8_target.json ND=${ND:-19} NS=${NS:-38} REFERENCE=0 VARIANTS="${VARIANTS:-bf16_base_compiled bf16_base_graphs fp8_base_graphs fp8_lora_r16_graphs}" step fp8_target "${PROBE_LIMIT:-400}" python3 benchmarks/compiled_probe.py ;;
    bf16_shapes) NAME=bf16_shapes.json ND=19 NS=38 REFERENCE=0 VARIANTS="${VARIANTS:-bf16_base_eager bf16_lora_r16_eager bf16_lora_r16_shapes_eager bf16_lora_2x_r16_eager bf16_lora_2x_r16_shapes_eager bf16_base_compiled bf16_lora_r16_compiled bf16_lora_r16_shapes_compiled}" step bf16_shapes "${PROBE_LIMIT:-560}" python3 benchmarks/compiled_probe.py ;;
    train_full) PROFILE=1 REGIONAL=1 LAYOUTS="${LAYOUTS:-split split_bf16 split_combo}" COMPILED_ONLY="${COMPILED_ONLY:-split_bf16 split_combo}" COMPILE=1 COMPILE_MODE=reduce-overhead COMPILE_LAYOUTS="${COMPILE_LAYOUTS:-split split_bf16 split_combo}" step flux_train_full "${TRAIN_LIMIT:-560}" python3 benchmarks/flux_train_bench.py ;;
    train_layer) step train_layer 120 python3 benchmarks/train_layer_bench.py ;;
    train_kernels) PROFILE=1 REGIONAL=1 LAYOUTS="${LAYOUTS:-fused_kernels fused}" COMPILED_ONLY="${COMPILED_ONLY:-fused}" COMPILE=1 COMPILE_MODE=reduce-overhead COMPILE_LAYOUTS="${COMPILE_LAYOUTS:-fused_kernels fused}" step flux_train_kernels "${TRAIN_LIMIT:-560}" python3 benchmarks/flux_train_bench.py ;;
    train_onecall) PROFILE=1 REGIONAL=1 LAYOUTS="${LAYOUTS:-fused fused_autograd}" COMPILED_ONLY="${COMPILED_ONLY:-fused fused_autograd}" COMPILE=1 COMPILE_MODE=reduce-overhead COMPILE_LAYOUTS="${COMPILE_LAYOUTS:-fused fused_autograd}" step flux_train_onecall "${TRAIN_LIMIT:-560}" python3 benchmarks/flux_train_bench.py ;;
    train_autotune) PROFILE=1 REGIONAL=1 LAYOUTS="${LAYOUTS:-split_bf16}" COMPILED_ONLY="${COMPILED_ONLY:-split_bf16}" COMPILE=1 COMPILE_MODE=max-autotune COMPILE_LAYOUTS="${COMPILE_LAYOUTS:-split_bf16}" step flux_train_autotune "${TRAIN_LIMIT:-560}" python3 benchmarks/flux_train_bench.py ;;
    autotune) NAME=autotune.json AUTOTUNE=1 ND=19 NS=38 REFERENCE=0 VARIANTS="${VARIANTS:-bf16_base_autotune bf16_lora_r16_autotune bf16_base_graphs bf16_lora_r16_graphs}" step autotune "${PROBE_LIMIT:-560}" python3 benchmarks/compiled_probe.py ;;
    wsprobe) step ws_probe 240 python3 benchmarks/ws_probe.py ;;
    kconcat) step kconcat_probe 120 python3 benchmarks/kconcat_probe.py ;;
    fused_tests) step gpu_fused_tests 240 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/gpu/test_fused.py ;;
    train_small) ND=4 NS=8 LAYOUTS="${LAYOUTS:-split_bf16 split fp8}" COMPILE=1 COMPILE_LAYOUTS="${COMPILE_LAYOUTS:-split_bf16 fp8}" step flux_train_small "${TRAIN_LIMIT:-300}" python3 benchmarks/flux_train_bench.py ;;
    compile) NAME=flux_compiled.json MODES="${MODES:-portable}" EAGER=0 FP8=1 PEFT=0 COMPILE=1 step flux_compiled 450 python3 benchmarks/flux_bench.py ;;
  esac
done
