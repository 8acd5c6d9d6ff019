#!/usr/bin/env bash
# The one prepared accelerator check (issue #3). On the device: OUT=<dir> bash benchmarks/gpu_check.sh
# Locally, to rehearse it on CPU with tiny settings: PYTHON=.venv/bin/python DEVICE=cpu QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}; OUT=${OUT:?set OUT}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}
mkdir -p "$OUT"
VARIANTS="crossformer_tiny crossformer_small crossformer_base crossformer_large crossformer_pp_small crossformer_pp_base crossformer_pp_large crossformer_pp_huge"
if [ "$QUICK" = 1 ]; then
  VARIANTS="crossformer_tiny crossformer_pp_small"; BATCH=2; IMG=64; ROUNDS=1; BASE_BATCH=1; STEPS=1
else
  BATCH=128; IMG=224; ROUNDS=5; BASE_BATCH=16; STEPS=3
fi
(nvidia-smi || true) > "$OUT/nvidia_smi.txt" 2>&1
"$PY" -c "import torch, timm; print(torch.__version__, timm.__version__)" > "$OUT/versions.txt" 2>&1

# 1. correctness on the device vs CPU, bf16 step, grad checkpointing memory
timeout 100 "$PY" benchmarks/gpu_correctness.py --device "$DEVICE" --base-batch "$BASE_BATCH" \
  > "$OUT/correctness.log" 2>&1 || echo "correctness failed: $?" >> "$OUT/correctness.log"

# 2. bf16 inference at batch 128, all variants and both Swins interleaved in one process
timeout 200 "$PY" benchmarks/ratios.py --models $VARIANTS swin_small_patch4_window7_224 \
  --compare swin_tiny_patch4_window7_224 --mode infer --device "$DEVICE" --amp bf16 \
  --batch-size "$BATCH" --img-size "$IMG" --rounds "$ROUNDS" --steps "$STEPS" --memory \
  > "$OUT/infer_bf16.json" 2> "$OUT/infer_bf16.log" || echo "infer failed: $?" >> "$OUT/infer_bf16.log"

# 3. the command itself: both modes against swin_tiny, bf16, channels-last
timeout 80 "$PY" -m crossformer benchmark --model crossformer_tiny --compare swin_tiny_patch4_window7_224 \
  --device "$DEVICE" --amp bf16 --batch-size "$BATCH" --img-size "$IMG" --rounds "$ROUNDS" --steps "$STEPS" \
  --channels-last --json > "$OUT/command_tiny_cl.json" 2> "$OUT/command_tiny_cl.log" || echo "command failed: $?" >> "$OUT/command_tiny_cl.log"
echo done >> "$OUT/versions.txt"
