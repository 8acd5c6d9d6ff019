#!/usr/bin/env bash
# Issue 15's GPU measurements in one call of the device tool (its steps' limits add up to 570 s,
# inside the tool's 10 minutes a command):
#   OUT=<dir> bash benchmarks/gpu_speed.sh
# Rehearse it on the CPU with tiny settings:
#   PYTHON=.venv/bin/python DEVICE=cpu QUICK=1 OUT=/tmp/gpu15 bash benchmarks/gpu_speed.sh
# Steps run most important first, each under its own time limit, and write to $OUT as they go,
# so a run cut short still returns what it finished.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}; OUT=${OUT:?set OUT}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}
mkdir -p "$OUT"
MODELS="crossformer_tiny crossformer_small crossformer_pp_small swin_small_patch4_window7_224"
COMPILED="crossformer_small"
PEER=swin_tiny_patch4_window7_224
if [ "$QUICK" = 1 ]; then
  BATCH=2; IMG=64; ROUNDS=1; STEPS=1; MODELS="crossformer_tiny crossformer_pp_small"; PEER=crossformer_small
  COMPILED="crossformer_tiny"; COMPILE_MODE=infer; LIMITS=(90 90 90 240)
else
  BATCH=128; IMG=224; ROUNDS=5; STEPS=3; COMPILE_MODE=both; LIMITS=(150 80 70 270)
fi
COMMON=(--device "$DEVICE" --amp bf16 --batch-size "$BATCH" --img-size "$IMG")
(nvidia-smi || true) > "$OUT/nvidia_smi.txt" 2>&1
"$PY" -c "import torch, timm; print(torch.__version__, timm.__version__)" > "$OUT/versions.txt" 2>&1

# 1. eager bf16 inference and training step (AdamW), every model against swin_tiny, interleaved in one process
timeout "${LIMITS[0]}" "$PY" benchmarks/ratios.py --models $MODELS --compare "$PEER" --mode both \
  "${COMMON[@]}" --rounds "$ROUNDS" --steps "$STEPS" > "$OUT/eager.json" 2> "$OUT/eager.log" \
  || echo "eager failed: $?" >> "$OUT/eager.log"

# 2. model FLOP utilisation: bf16 GEMM peak on the device, crossformer_small's share in both modes
timeout "${LIMITS[1]}" "$PY" -m crossformer benchmark --model crossformer_small --mode both --peak \
  "${COMMON[@]}" --rounds 3 --steps "$STEPS" --no-memory --json > "$OUT/peak_small.json" 2> "$OUT/peak_small.log" \
  || echo "peak failed: $?" >> "$OUT/peak_small.log"

# 3. where a bf16 training step of crossformer_small spends its GPU time, kernel by kernel
timeout "${LIMITS[2]}" "$PY" benchmarks/profile_step.py --model crossformer_small --mode train \
  --device "$DEVICE" --amp bf16 --batch-size "$BATCH" --img-size "$IMG" "$IMG" --top 40 \
  > "$OUT/profile_train_small.txt" 2>&1 || echo "profile failed: $?" >> "$OUT/profile_train_small.txt"

# 4. torch.compile end to end against eager, compile time = the first (warm-up) step
timeout "${LIMITS[3]}" "$PY" benchmarks/ratios.py --models $COMPILED --compare "$PEER" --mode "$COMPILE_MODE" --compile \
  "${COMMON[@]}" --rounds "$ROUNDS" --steps "$STEPS" > "$OUT/compiled.json" 2> "$OUT/compiled.log" \
  || echo "compiled failed: $?" >> "$OUT/compiled.log"
echo done >> "$OUT/versions.txt"
