#!/bin/bash
# One device call: our DiTs beside diffusers' at full size (random bf16 weights), eager and torch.compile.
# Expects the diffusers 0.42.1 wheel in .whl/ at the repo root (carried with the run; see docs/PERF.md).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/smi.txt"
python3 -c "import torch; print('torch', torch.__version__)"
timeout -k 5 ${KLEIN_LIMIT:-240} python3 bench/bench_dit.py --model klein --sizes 1024,512 --ref --compile --out "$OUT" 2>&1 \
  | grep -v -E "UserWarning|warnings.warn" | tee "$OUT/klein.log"
timeout -k 5 ${ZIMAGE_LIMIT:-240} python3 bench/bench_dit.py --model zimage --sizes 1024,512 --compile --out "$OUT" 2>&1 \
  | grep -v -E "UserWarning|warnings.warn" | tee "$OUT/zimage.log"
