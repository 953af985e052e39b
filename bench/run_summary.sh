#!/bin/bash
# One device call -> $OUT/summary.json (issue 12 schema), $OUT/parts.json (every measurement), $OUT/log.txt.
# Expects the diffusers 0.42.1 wheel in .whl/ at the repo root (carried with the run; see docs/PERF.md), and for the
# comfy_native part comfy_kitchen's wheel beside it (bench/comfy_native.py) plus .dev/comfyui.
# Arguments go to bench/bench_summary.py (e.g. --parts klein_step,qwen3_vae --budget 420).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$OUT/smi.txt"
cat "$OUT/smi.txt"
# GPU clocks, power and temperature every 0.5 s beside the run ($OUT/clocks.csv, UTC timestamps): a slow image can
# then be checked against the clocks of that moment. log.txt starts with the UTC time its [0.0s] stands for.
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
  --format=csv,nounits -lms 500 > "$OUT/clocks.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
# the GPU tests of the eager path's Triton kernel, before anything is timed with it
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py > "$OUT/gpu_tests.txt" 2>&1
tail -1 "$OUT/gpu_tests.txt"
set -o pipefail
{ echo "[   0.0s] start $(date -u +%Y/%m/%d\ %H:%M:%S.%N)"; python3 bench/bench_summary.py --out "$OUT" "$@" 2>&1; } |
  grep --line-buffered -v -E "UserWarning|warnings.warn" | tee "$OUT/log.txt"
