#!/bin/bash
# One device call: our components beside diffusers'/transformers' at full size (random bf16 weights).
# Expects the diffusers 0.42.1 wheel in .whl/ at the repo root (carried with the run; see docs/PERF.md).
# MODELS picks the parts (default: all): klein zimage qwen3 vae.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for m in $(echo ${MODELS:-klein zimage qwen3 vae} | tr " " "\n" | grep -v "^lora$"); do
  case $m in
    klein) args="--sizes 1024,512 --ref --compile"; limit=240;;
    zimage) args="--sizes 1024,512 --compile"; limit=240;;
    *) args=""; limit=120;;
  esac
  timeout -k 5 $limit python3 bench/bench_dit.py --model $m $args --out "$OUT" 2>&1 \
    | grep -v -E "UserWarning|warnings.warn" | tee "$OUT/$m.log"
done
# LoRA cost (bench/bench_lora.py): MODELS=lora runs only this; bf16, then fp8 load-time quantization
if [[ " ${MODELS:-} " == *" lora "* ]]; then
  for q in none fp8; do
    timeout -k 5 240 python3 bench/bench_lora.py --quantization $q --out "$OUT/lora_$q.json" 2>&1 \
      | grep -v -E "UserWarning|warnings.warn" | tee "$OUT/lora_$q.log"
  done
fi
