#!/usr/bin/env bash
# Issue 11's figures on SmolLM2-135M, in one run (about 30 minutes on 2 cores, 15 of them the first matrix sweep):
#   1. the executor table: original bf16, bitsandbytes (LLM.int8, nf4), torchao (int8 weight-only, int4 HQQ g64),
#      torch dynamic int8 (fp32), each with --quality, and eager vs --compile where the backend compiles;
#   2. a torchao matrix-granularity sensitivity plan at 6.0 bits (with its predicted / measured / random-plan
#      checks), benchmarked eager and compiled;
#   3. one report over everything.
# Speed: the math task (2 prompts), 32 new tokens, 3 repeats, greedy; quality: 4096 tokens of lee_background.cor.
# Usage: bash bench/executors.sh [OUT_DIR]   (default /tmp/ewq-executors)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ewq-executors}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
SPEED=(--tasks math --max-new-tokens 32 --repeats 3 --no-progress --out-dir "$OUT/results")
Q=(--quality --eval-tokens 4096)
last() { tail -1; }

# 1. executors, side by side in one run (the 8-bit / 4-bit entries of the built-in uniform plans)
"$PY" benchmark_original.py "${SPEED[@]}" "${Q[@]}" | last
"$PY" benchmark_original.py "${SPEED[@]}" --compile | last
for plan in uniform-8bit uniform-4bit; do
  "$PY" benchmark.py --plan "$plan" --backend bitsandbytes "${SPEED[@]}" "${Q[@]}" | last
  "$PY" benchmark.py --plan "$plan" --backend torchao "${SPEED[@]}" "${Q[@]}" | last
  "$PY" benchmark.py --plan "$plan" --backend torchao "${SPEED[@]}" --compile | last
done
"$PY" benchmark.py --plan uniform-8bit --backend torch-dynamic "${SPEED[@]}" "${Q[@]}" | last

# 2. a torchao matrix-granularity sensitivity plan at 6.0 bits (with its predicted / measured / random-plan checks)
ao_plan=$("$PY" main_cache_model.py --no-progress --method sensitivity --granularity matrix --backend torchao \
          --target-bits 6.0 | tee "$OUT/plan_torchao_matrix.log" | last)
"$PY" benchmark.py --plan "$ao_plan" --backend torchao "${SPEED[@]}" "${Q[@]}" | last
"$PY" benchmark.py --plan "$ao_plan" --backend torchao "${SPEED[@]}" --compile | last

# 3. the report
"$PY" -m ewq.report "$OUT/results" --out-dir "$OUT" | tee "$OUT/report.log" | tail -40
