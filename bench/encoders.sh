#!/usr/bin/env bash
# Issue 13's figures on the embedded encoder minilm-l6 (all-MiniLM-L6-v2, pristine fp32), in one run (~6 minutes
# on 2 cores): which executor really speeds the encoder up on this CPU, at what fidelity.
#   1. original fp32; every block 8-bit with torch's dynamic int8 (the user's method), torchao weight-only int8,
#      torchao int8 with per-token activation scales, bitsandbytes LLM.int8;
#   2. measured-sensitivity plans (mean 1 - cosine on 128 calibration sentences from the end of the corpus) per
#      matrix for torch-dynamic at 14 and 19 bits (raw matrices stay fp32: 32 bits each), and for torchao int8
#      activations at 8.5 bits;
#   3. one report. Speed: 128 sentences at batch 1 and 32, 3 repeats; fidelity: 1024 sentences of lee_background.cor.
# Usage: bash bench/encoders.sh [OUT_DIR]   (default /tmp/ewq-encoders)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ewq-encoders}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
RUN=(--model minilm-l6 --repeats 3 --no-progress --out-dir "$OUT/results")
PLANS=(--model minilm-l6 --no-progress --out-dir "$OUT/plans" --method sensitivity --granularity matrix)
last() { tail -1; }

"$PY" benchmark_original.py "${RUN[@]}" | last
"$PY" benchmark.py "${RUN[@]}" --plan uniform-8bit --backend torch-dynamic | last
"$PY" benchmark.py "${RUN[@]}" --plan uniform-8bit --backend torchao | last
"$PY" benchmark.py "${RUN[@]}" --plan uniform-8bit --backend torchao --int8-activations | last
"$PY" benchmark.py "${RUN[@]}" --plan uniform-8bit --backend bitsandbytes | last
for bits in 14 19; do
  plan=$("$PY" main_cache_model.py "${PLANS[@]}" --backend torch-dynamic --target-bits "$bits" | last)
  "$PY" benchmark.py "${RUN[@]}" --plan "$plan" --backend torch-dynamic | last
done
plan=$("$PY" main_cache_model.py "${PLANS[@]}" --backend torchao --int8-activations --target-bits 8.5 | last)
"$PY" benchmark.py "${RUN[@]}" --plan "$plan" --backend torchao | last
"$PY" -m ewq.report "$OUT/results" --out-dir "$OUT" | last
