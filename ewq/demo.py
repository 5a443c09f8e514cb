"""The whole story on the embedded default model, on the CPU, in a few minutes:

    plan -> EWQ benchmark -> original benchmark -> uniform 8-bit and 4-bit baselines -> report

Each step runs the real script in its own process (so each variant's memory is its own) and the
last thing printed is the comparison table. The suite is shortened for the CPU (see DEMO_ARGS).
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


def step(title: str, argv: list) -> str:
    """Run one script; show its progress on stderr; return the last line of its stdout (a path)."""
    print(f"== {title}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable] + argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise EWQError(f"step '{title}' failed (exit {proc.returncode}); its message is above")
    summary = [line for line in lines if line.startswith(("blocks ", "ewq", "original:", "uniform", "quality:"))]
    for line in summary:
        print("   " + line)
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    return lines[-1]


def main(argv=None):
    p = ArgumentParser(prog="python -m ewq.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model to run the story on (default: the embedded SmolLM2-135M)")
    p.add_argument("--full", action="store_true",
                   help="the full suite with the scripts' defaults (all 16 prompts, 4096 evaluation tokens on the CPU) "
                        "and the softmax-entropy plan too; takes tens of minutes on a 2-core CPU")
    p.add_argument("--out-dir", default="benchmark_results", help="where results and the report go")
    args = p.parse_args(argv)
    bench_args = (["--quality", "--no-progress"] if args.full else DEMO_ARGS) + ["--out-dir", args.out_dir]
    start = time.perf_counter()
    if not args.full:
        print("note: the CPU demo runs a shortened suite: " + " ".join(DEMO_ARGS) + " (--full for the whole suite)")
    model = ["--model", args.model]
    plans = [("plan (histogram entropy)", step("plan", ["main_cache_model.py", "--no-progress"] + model))]
    if args.full:
        plans.append(("plan (softmax entropy)", step("plan", ["main_cache_model.py", "--no-progress", "--entropy",
                                                               "softmax"] + model)))
    results = [step(f"EWQ benchmark, {title}", ["benchmark.py", "--plan", plan] + model + bench_args) for title, plan in plans]
    results += [
        step("original benchmark", ["benchmark_original.py"] + model + bench_args),
        step("uniform 8-bit baseline", ["benchmark.py", "--plan", "uniform-8bit"] + model + bench_args),
        step("uniform 4-bit baseline", ["benchmark.py", "--plan", "uniform-4bit"] + model + bench_args),
    ]
    print("== report", flush=True)
    proc = subprocess.run([sys.executable, "-m", "ewq.report", "--out-dir", args.out_dir] + results, cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise EWQError("the report failed; its message is above")
    print(proc.stdout.rstrip())
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
