#!/usr/bin/env bash
# The pointer-loaded LoRA tail (ranks that are not multiples of 8, about 3x the cost of a rank-16
# TMA tail: benchmarks/README.md, session 15) in three variants of the fused kernel, one device call:
#   current        P loaded (BR, BN), 2-byte strided reads, after the K loop (the shipped kernel)
#   p_order        tail_variants/p_order.patch: P loaded (BN, BR), each row's ranks adjacent, then transposed
#   p_order_early  tail_variants/p_order_early.patch: the same, h and P loaded before the K loop
#                  (their latency behind it; the CPU compile shows more shared memory on fp8 full tiles)
# Each runs ws_probe.py (RANKS, default "16 4"; flattened tiles) into <variant>/; then
# tests/gpu/test_fused.py on TEST_VARIANT (default p_order_early). Everything comes back as one tar,
# $OUT/tail_variants.tar, rewritten after each step (a device call returns at most 8 files). Carry .whl/ as for gpu_session.sh.
#   bash benchmarks/tail_variants.sh     # at most 9.5 min (STEP_BUDGET per probe, default 110 s; the tests 200 s)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"; W=/tmp/tail_variants; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpu.txt" 2>&1
apply() {  # apply (or with -R undo) one variant's patch; git apply works outside a repository too
  local patch="benchmarks/tail_variants/$1.patch"; shift
  if git apply --check "$@" "$patch" 2>/dev/null; then git apply "$@" "$patch"
  elif patch --dry-run -s -p1 "$@" < "$patch" >/dev/null 2>&1; then patch -s -p1 "$@" < "$patch"
  else return 1; fi
}
run_variant() {
  local variant=$1 steps=$2
  if [ "$variant" != current ] && ! apply "$variant"; then  # a stale patch: say so, measure nothing under its name
    echo "$variant.patch does not apply to this kernel" | tee "$W/$variant.failed"; return
  fi
  OUT="$W/$variant" BUDGET="${STEP_BUDGET:-110}" RANKS="${RANKS:-16 4}" TILE_VARIANTS=flat STEPS="$steps" bash benchmarks/gpu_session.sh
  [ "$variant" != current ] && apply "$variant" -R
  tar -cf "$OUT/tail_variants.tar" -C "$W" .
}
for variant in current p_order p_order_early; do run_variant "$variant" wsprobe; done
STEP_BUDGET=200 run_variant "${TEST_VARIANT:-p_order_early}" fused_tests
