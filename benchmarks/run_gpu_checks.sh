#!/usr/bin/env bash
# All GPU checks in one go, for a lent GPU machine that has torch but not diffusers/pydantic (carried, see
# docs/backends.md "GPU benchmark"). Results land in $OUT (or benchmarks/results/gpu when OUT is unset).
# Run from the repository root; the benchmarks run as modules, and the carried folders go on PYTHONPATH.
#   carry: benchmarks/_work/vendor (diffusers, pydantic, ... as a --target dir)
#          benchmarks/_work/degrade_gpu (pydantic wheels + a basicsr copy for the reference timings)
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L | tee "$OUT/device.txt"
VENDOR=$PWD/benchmarks/_work/vendor

echo "== 1. built-in pipeline pieces on CUDA (tiny model, DPO step)"
PYTHONPATH=$PWD:$VENDOR timeout 120 python3 -m benchmarks.gpu_pipeline_check --out "$OUT/gpu_pipeline_check.json" \
  2>&1 | grep -v -i warn | tee "$OUT/pipeline.log"

echo "== 2. degradation speed and CPU/GPU agreement vs BasicSR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  benchmarks/_work/degrade_gpu/whl/*.whl
PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks/_work/degrade_gpu/basicsr_site \
  timeout 170 python3 -m benchmarks.degrade_speed --n 32 --out "$OUT/degrade_speed_gpu.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/degrade.log"

echo "== 3. Real-ISR backends at real size: batched sampler vs plain diffusers loop"
PYTHONPATH=$PWD:$VENDOR timeout 330 python3 -m benchmarks.sample_gpu --compile --out "$OUT/sample_gpu.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/sample.log"
if [ "${PIPESTATUS[0]}" = 3 ]; then
  PYTHONPATH=$PWD:$VENDOR/hub:$VENDOR timeout 300 python3 -m benchmarks.sample_gpu --compile \
    --out "$OUT/sample_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/sample.log"
fi
exit 0
