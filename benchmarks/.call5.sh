set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p $OUT/a
timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/gpu/test_fused.py > $OUT/a/test_fused.log 2>&1; echo tests rc=$?; tail -3 $OUT/a/test_fused.log
OUT=$OUT/a PROBE_LIMIT=420 VARIANTS="bf16_base_compiled bf16_base_graphs fp8_lora_r16_graphs fp8_lora_r16_wide_graphs" STEPS="probe_full" bash benchmarks/gpu_session.sh
