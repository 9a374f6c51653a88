#!/usr/bin/env bash
# The LoRA tail of the fused kernel in several variants, then a profile of a training step, in one
# device call: ws_probe.py (RANKS, default "16 4 4qkv"; flattened tiles) for each variant in
# VARIANTS (default "current"; empty: none; STEP_BUDGET s each, default 80), then tests/gpu
# (TEST_STEPS, default "tests", TEST_BUDGET s, default 150) on TEST_VARIANT (default current), then
# EXTRA_STEPS (gpu_session.sh steps, default "train_onecall": the fused-layout training step with
# bf16 adapters against the frozen one, compiled, CUDA graphs, 4 + 8 blocks unless ND/NS say
# otherwise, PROFILE_TOP=80 kernels by device time) on the current tree with whatever time is left
# of TOTAL (default 540 s). A variant other than "current" is the tree with
# benchmarks/tail_variants/<variant>.patch applied (and undone after):
#   old_grad_layout   the one-call training gradients as before session 19 (dD, dU row-major: one
#                     copy per parameter and step in AccumulateGrad); for train_onecall A/B runs
# (n_major.patch, every tail by TMA, was measured here in session 19 and shipped.)
# Everything comes back as one tar, $OUT/tail_variants.tar, rewritten after each step (a device
# call returns at most 8 files). Carry .whl/ as for gpu_session.sh.
#   bash benchmarks/tail_variants.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"; W=/tmp/tail_variants; mkdir -p "$OUT" "$W"
START=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpu.txt" 2>&1
apply() {  # apply (or with -R undo) one variant's patch; git apply works outside a repository too
  local patch="benchmarks/tail_variants/$1.patch"; shift
  if git apply --check "$@" "$patch" 2>/dev/null; then git apply "$@" "$patch"
  elif patch --dry-run -s -p1 "$@" < "$patch" >/dev/null 2>&1; then patch -s -p1 "$@" < "$patch"
  else return 1; fi
}
run_variant() {  # variant, steps, step budget (s)
  local variant=$1 steps=$2 budget=$3
  if [ "$variant" != current ] && ! apply "$variant"; then  # a stale patch: say so, measure nothing under its name
    echo "$variant.patch does not apply to this kernel" | tee "$W/$variant.failed"; return
  fi
  OUT="$W/$variant" BUDGET="$budget" RANKS="${RANKS:-16 4 4qkv}" TILE_VARIANTS=flat STEPS="$steps" bash benchmarks/gpu_session.sh
  [ "$variant" != current ] && apply "$variant" -R
  tar -cf "$OUT/tail_variants.tar" -C "$W" .
}
for variant in ${VARIANTS-current}; do run_variant "$variant" wsprobe "${STEP_BUDGET:-80}"; done
run_variant "${TEST_VARIANT:-current}" "${TEST_STEPS:-tests}" "${TEST_BUDGET:-150}"
left=$(( ${TOTAL:-540} - $(date +%s) + START ))
extra="${EXTRA_STEPS-train_onecall}"  # EXTRA_STEPS= (empty): none
if [ -n "$extra" ] && [ "$left" -gt 60 ]; then
  ND="${ND:-4}" NS="${NS:-8}" LAYOUTS="${LAYOUTS:-fused_bf16}" COMPILED_ONLY="${COMPILED_ONLY:-fused_bf16}" \
    COMPILE_LAYOUTS="${COMPILE_LAYOUTS:-fused_bf16}" PROFILE_TOP="${PROFILE_TOP:-80}" \
    run_variant current "$extra" "$left"
fi
