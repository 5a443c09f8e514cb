#!/usr/bin/env bash
# Issue 21's load figures: EWQ's server batched vs one input at a time (--max-batch 1) vs infinity-emb 0.0.78, on
# MiniLM-L6 fp32 and on MiniLM-L6 with torchao weight-only int8 (batch-invariant, so EWQ batches it), 1, 8 and 64
# closed-loop clients, 5 s per point, 2 alternating rounds (~6 minutes with the save). infinity-emb lives in its own
# virtual environment (INFINITY_VENV, default /tmp/svc/infvenv); create it with
#   python3.11 -m venv /tmp/svc/infvenv && /tmp/svc/infvenv/bin/pip install "infinity-emb[server,torch]==0.0.78" torch==2.13.0
# Usage: bash bench/serve_load.sh [OUT_DIR]   (default /tmp/ewq-serve-load; THREADS=1 by default: see --threads)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ewq-serve-load}
PY=${PYTHON:-.venv/bin/python}
LOAD=(--threads "${THREADS:-1}" --rounds 2 --seconds 5 --infinity-venv "${INFINITY_VENV:-/tmp/svc/infvenv}")
mkdir -p "$OUT"

"$PY" benchmark.py --model minilm-l6 --plan uniform-8bit --backend torchao --save --out-dir "$OUT/results" \
    --plans-dir "$OUT/models" --eval-sentences 64 --speed-sentences 8 --repeats 1 --no-progress | tail -1
saved=$(ls -d "$OUT"/models/minilm-l6-*/ | head -1)
"$PY" bench/serve_load.py --model minilm-l6 "${LOAD[@]}" --out "$OUT/serve_load_minilm_fp32.json"
"$PY" bench/serve_load.py --model "$saved" "${LOAD[@]}" --out "$OUT/serve_load_minilm_torchao_int8_weight_only.json"
