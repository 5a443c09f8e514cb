#!/usr/bin/env bash
# Every CPU figure in docs/RESULTS.md for SmolLM2-135M, in one run (about 40 minutes on 2 cores):
#   1. the whole story with the full suite (issue 4): original, EWQ histogram k=1, EWQ softmax, uniform 8/4-bit;
#   2. equal-size plans (issue 5): sensitivity, entropy and position at the EWQ default plan's size, 6.0 and
#      4.5 bits, each benchmarked with --quality on the same evaluation windows (short speed suite: only
#      quality matters for this comparison), then one report over everything.
# Usage: bash bench/cpu_results.sh [OUT_DIR]   (default /tmp/ewq-cpu-results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ewq-cpu-results}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -m ewq.demo --full --out-dir "$OUT/story" | tee "$OUT/story.log"

QUICK=(--tasks reasoning --max-new-tokens 8 --repeats 1 --quality --no-progress --out-dir "$OUT/equal_size")
rule_plan=$("$PY" main_cache_model.py --no-progress | tail -1)
default_bits=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['size']['avg_bits_per_weight'])" "$rule_plan")
for bits in "$default_bits" 6.0 4.5; do
  for method in sensitivity entropy position; do
    plan=$("$PY" main_cache_model.py --no-progress --method "$method" --target-bits "$bits" | tail -1)
    "$PY" benchmark.py --plan "$plan" "${QUICK[@]}" | tail -1
  done
done
"$PY" benchmark.py --plan "$rule_plan" "${QUICK[@]}" | tail -1
for plan in uniform-8bit uniform-4bit; do "$PY" benchmark.py --plan "$plan" "${QUICK[@]}" | tail -1; done
"$PY" benchmark_original.py "${QUICK[@]}" | tail -1
"$PY" -m ewq.report "$OUT/equal_size" --out-dir "$OUT/equal_size" | tee "$OUT/equal_size.log"
