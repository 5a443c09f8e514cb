#!/usr/bin/env python
"""Step 1 of EWQ: analyse a checkpoint's blocks (streaming, CPU only) and write a quantization plan.

The last line of stdout is the path of the plan JSON."""

import sys

from ewq.common import ArgumentParser, run_cli
from ewq.entropy import ENTROPY_KINDS, HIST_BINS
from ewq.source import DEFAULT_MODEL, DEFAULT_MODELS_DIR
from ewq.plan import format_summary, make_plan


def nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(text) from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


nonnegative_float.__name__ = "non-negative number"


def parse_args(argv):
    p = ArgumentParser(prog="main_cache_model.py", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local directory (config.json + *.safetensors), Hugging Face id, or '{DEFAULT_MODEL}' "
                        f"(the embedded SmolLM2-135M-Instruct; default)")
    p.add_argument("--entropy", choices=ENTROPY_KINDS, default="histogram",
                   help="histogram: the PoC's 128-bin Shannon entropy in bits (default); "
                        "softmax: the paper's entropy of softmax(weights), normalised by ln(n)")
    p.add_argument("--k", type=nonnegative_float, default=1.0,
                   help="blocks with entropy below mu - k*sigma get 4-bit, below mu 8-bit, others stay raw (default 1.0)")
    p.add_argument("--force", action="store_true", help="rewrite the plan even if one exists for the same weights and settings")
    p.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where fetched/converted models live (default models/)")
    p.add_argument("--out-dir", default="quantized_models", help="where the plan is written (default quantized_models/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path, plan, reused = make_plan(args.model, entropy=args.entropy, k=args.k, bins=HIST_BINS, force=args.force,
                                   models_dir=args.models_dir, out_dir=args.out_dir, progress=not args.no_progress)
    print(format_summary(plan))
    if reused:
        print("a plan for these weights and settings already existed: reused it (--force to rewrite)")
    print(path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
