"""The whole story on the embedded default model, on this machine, in a few minutes:

    the original -> the proof of concept's way (entropy rule, bitsandbytes) -> the uniform 8-bit and 4-bit
    baselines -> a per-matrix plan measured at a size target, run by this machine's fastest executor -> report

Each step runs the real script in its own process (so each variant's memory is its own). Every variant is
compared with the original run the same way (eager, or compiled when the fastest executor here compiles). The
report marks the variants smaller and faster than that original and its last lines say which to use and what it
costs. The suite is shortened for a 2-core CPU (see DEMO_ARGS); `--full` runs the scripts' defaults.
"""

import subprocess
import sys
import time
from pathlib import Path

from .common import ArgumentParser, EWQError, run_cli

REPO = Path(__file__).resolve().parent.parent
# Shortened for a 2-core CPU: 2 task categories (4 prompts, 2 Vietnamese, 2 English), 16 new tokens,
# 2 repeats, 1024 evaluation tokens. The full suite is `python benchmark.py --quality`.
DEMO_ARGS = ["--tasks", "question_answering,translation", "--max-new-tokens", "16", "--repeats", "2",
             "--quality", "--eval-tokens", "1024", "--no-progress"]
# the measured plan: per matrix, at 6 bits per weight, with the fast sensitivity sweep (docs/RESULTS.md: it picks
# plans as good as the exact sweep's); the demo calibrates on 256 tokens instead of 512 to fit its time
TARGET_BITS = "6.0"
DEMO_CALIB_TOKENS = "256"


def step(title: str, argv: list) -> list:
    """Run one script; show its progress on stderr; return its stdout lines (the last is a path)."""
    print(f"== {title}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable] + argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise EWQError(f"step '{title}' failed (exit {proc.returncode}); its message is above")
    summary = [line for line in lines if line.startswith(("blocks ", "matrices ", "checks ", "ewq", "original",
                                                          "uniform", "sensitivity", "quality:", "executor:", "mode:"))]
    for line in summary:
        print("   " + line)
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    return lines


def fastest_executor(model: str, models_dir: str, progress: bool = True):
    """The executor and mode the probe picks on this machine (benchmark.py's default; cached per machine)."""
    from . import executor
    from .checkpoint import open_checkpoint
    from .device import pick_dtype
    from .source import resolve_model

    ckpt = open_checkpoint(resolve_model(model, models_dir).path)
    return executor.choose(executor.Layout.of_checkpoint(ckpt), "cpu", lambda b: pick_dtype(None, "cpu", b, ckpt.kind),
                           progress)


def main(argv=None):
    p = ArgumentParser(prog="python -m ewq.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model to run the story on (default: the embedded SmolLM2-135M)")
    p.add_argument("--full", action="store_true",
                   help="the full suite with the scripts' defaults (all 16 prompts, 4096 evaluation tokens on the CPU, "
                        "512 calibration tokens) and the softmax-entropy plan too; takes tens of minutes on 2 cores")
    p.add_argument("--out-dir", default="benchmark_results", help="where results and the report go")
    p.add_argument("--models-dir", default="models", help="where the embedded model is converted to (default models/)")
    args = p.parse_args(argv)
    bench_args = (["--quality", "--no-progress"] if args.full else DEMO_ARGS) + ["--out-dir", args.out_dir]
    start = time.perf_counter()
    if not args.full:
        print("note: the demo runs a shortened suite: " + " ".join(DEMO_ARGS) + f" and calibrates its measured plan "
              f"on {DEMO_CALIB_TOKENS} tokens (--full for the scripts' defaults)")
    model = ["--model", args.model, "--models-dir", args.models_dir]
    fast = fastest_executor(args.model, args.models_dir)
    print(f"== this machine's fastest executor: {fast.label} ({fast.why})", flush=True)
    mode = ["--compile"] if fast.compile else ["--eager"]

    # the proof of concept's way: the entropy rule, bitsandbytes, eager, against the eager original
    plans = [("plan (histogram entropy)", step("plan", ["main_cache_model.py", "--no-progress"] + model)[-1])]
    if args.full:
        plans.append(("plan (softmax entropy)", step("plan", ["main_cache_model.py", "--no-progress", "--entropy",
                                                               "softmax"] + model)[-1]))
    poc = ["--backend", "bitsandbytes", "--eager"]
    results = [step("original, eager", ["benchmark_original.py", "--eager"] + model + bench_args)[-1]]
    results += [step(f"proof of concept: {title}, bitsandbytes", ["benchmark.py", "--plan", plan] + poc + model +
                     bench_args)[-1] for title, plan in plans]
    results += [step(f"uniform {b} baseline, bitsandbytes", ["benchmark.py", "--plan", f"uniform-{b}"] + poc + model +
                     bench_args)[-1] for b in ("8bit", "4bit")]

    # the model this project makes: a per-matrix plan measured with the executor that will run it
    calib = [] if args.full else ["--calib-tokens", DEMO_CALIB_TOKENS]
    measured = step(f"measured plan, {TARGET_BITS} bits per weight, per matrix, {fast.backend}",
                    ["main_cache_model.py", "--method", "sensitivity", "--granularity", "matrix", "--backend",
                     fast.backend, "--target-bits", TARGET_BITS, "--no-progress"] + calib + model)[-1]
    if fast.compile:
        results.append(step("original, compiled (the same mode as the fast executor)",
                            ["benchmark_original.py", "--compile"] + model + bench_args)[-1])
    results.append(step(f"measured plan, {fast.label}", ["benchmark.py", "--plan", measured, "--backend", fast.backend]
                        + mode + model + bench_args)[-1])

    print("== report", flush=True)
    proc = subprocess.run([sys.executable, "-m", "ewq.report", "--out-dir", args.out_dir] + results, cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise EWQError("the report failed; its message is above")
    text = proc.stdout.rstrip()
    print(text)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    # the last lines: which variant to use and what it costs (or why none is faster here)
    advice = [line for line in text.splitlines() if line.startswith(("Use ", "No quantized variant"))]
    if not args.full:
        advice.append(f"(The demo's measured plan was calibrated on {DEMO_CALIB_TOKENS} tokens to fit its time; "
                      f"docs/RESULTS.md gives its KL beside the full calibration's.)")
    print("\n".join(["", "== what to use"] + advice))


if __name__ == "__main__":
    sys.exit(run_cli(main))
