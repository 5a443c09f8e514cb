#!/usr/bin/env python
"""GPU figures, one device call per set: EWQ vs the original vs uniform 8/4-bit on Llama-3.1-8B's shapes.

On the GPU machine (no network there), one set
  1. writes a checkpoint with the exact Llama-3.1-8B configuration (bench/configs/llama-3.1-8b.json) and random
     fp16 weights, plus a byte-level tokenizer: valid for speed and memory, not for quality;
  2. plans it with main_cache_model.py (the PoC's entropy rule), then benchmarks, one process each and side by
     side: the original, the EWQ plan, uniform 8-bit and uniform 4-bit with the set's executor and dtype;
  3. checks the CUDA path: greedy tokens of every variant against the original's; in the eager sets, a saved and
     reloaded mixed model (raw, 8-bit and 4-bit blocks) must give the logits it gave before saving, bit for bit;
  4. measures the device's copy bandwidth and a bare model.generate loop (harness overhead), and profiles the
     bitsandbytes EWQ decode by kernel if it is slower than the original;
  5. after every step rewrites gpu_summary.json and gpu_results.json in --out ($OUT): a call stopped at its time
     limit still brings back every figure finished before it.

Sets (each sized for one 10-minute device call; a step that would not finish inside --budget-s is skipped and
listed in the summary, never silently dropped):
  bnb       float16, eager: the PoC's executor (bitsandbytes LLM.int8 / nf4)
  torchao   bfloat16, eager: torchao int8 weight-only / int4 HQQ (its CUDA int4 kernel takes bf16 only)
  compiled  bfloat16, static cache + torch.compile: the original and the torchao variants

    bash bench/gpu_wheels.sh                           # here: the wheels the GPU image lacks, into .whl/
    python bench/gpu.py --set bnb                      # on the device (see docs/RESULTS.md, "GPU figures")
    python bench/gpu.py --config tiny.json --device cpu --max-new-tokens 4 --repeats 1   # a dry run here
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ewq.common import write_json_atomic  # noqa: E402

SETS = {
    "bnb": {"backend": "bitsandbytes", "dtype": "float16", "compile": False},
    "torchao": {"backend": "torchao", "dtype": "bfloat16", "compile": False},
    "compiled": {"backend": "torchao", "dtype": "bfloat16", "compile": True},
}
# in order of what the issue asks first: "ewq" is the plan main_cache_model.py wrote (the PoC's claim, the 1.3x goal),
# then uniform int4 (the 1.7x goal), then uniform int8
VARIANTS = ("ewq", "uniform-4bit", "uniform-8bit")


class Steps:
    """Runs the set's steps against one deadline; records what finished, failed or was skipped, and why."""

    def __init__(self, budget_s: float, log, in_process: bool = False):
        self.start, self.budget_s, self.log, self.in_process = time.perf_counter(), budget_s, log, in_process
        self.longest_s = 0.0  # a step not yet run is assumed to take as long as the longest one so far
        self.failed, self.skipped = [], []

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start) if self.budget_s else float("inf")

    def fits(self, name: str, expected_s=None) -> bool:
        expected_s = self.longest_s if expected_s is None else expected_s
        if self.left_s() < expected_s:
            self.skipped.append(f"{name}: {max(self.left_s(), 0):.0f} s of --budget-s left, it would take about "
                                f"{expected_s:.0f} s")
            print(f"skipped (time budget): {name}", flush=True)
            return False
        return True

    def script(self, name: str, argv: list, expected_s=None):
        """One of the project's scripts in its own process; (stdout lines, or None if it failed or timed out)."""
        if not self.fits(name, expected_s):
            return None
        start = time.perf_counter()
        timeout = None if self.left_s() == float("inf") else max(self.left_s(), 1)
        try:
            if self.in_process:
                stdout, stderr, code = run_here(argv)
            else:
                proc = subprocess.run([sys.executable] + argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
                stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
            error = code and f"exit {code}"
        except subprocess.TimeoutExpired as e:
            stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
            error = f"timed out at the end of --budget-s ({timeout:.0f} s left when it started)"
        seconds = time.perf_counter() - start
        self.longest_s = max(self.longest_s, seconds)
        self.log.write(f"$ {' '.join(argv)}\n{stdout}{stderr[-3000:]}\n({seconds:.0f} s)\n")
        self.log.flush()
        print(f"{name}: {'FAILED, ' + error if error else 'done'} ({seconds:.0f} s)", flush=True)
        if error:
            self.failed.append({"step": name, "error": error, "stderr_tail": stderr.strip().splitlines()[-5:]})
            return None
        return stdout.strip().splitlines()

    def call(self, name: str, fn, *args, expected_s=None):
        """A measurement made in this process; its failure is recorded, not fatal."""
        if not self.fits(name, expected_s):
            return None
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:  # a GPU-side failure must not lose the figures already taken
            self.failed.append({"step": name, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"{name}: FAILED, {type(e).__name__}: {e}", flush=True)
            return None
        finally:
            self.longest_s = max(self.longest_s, time.perf_counter() - start)
            free_gpu_memory()


def run_here(argv: list) -> tuple:
    """(stdout, stderr, exit code) of `python *argv` run in this process, from the repository root: what the dry run
    uses (--in-process), with no time limit but the budget check made before the step starts."""
    import contextlib
    import io
    import runpy

    stdout, stderr, saved_argv, saved_cwd = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    module = argv[1] if argv[0] == "-m" else None
    sys.argv = [module or argv[0], *argv[2 if module else 1:]]
    os.chdir(REPO)
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(REPO / argv[0]), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return stdout.getvalue(), stderr.getvalue(), code


def free_gpu_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_dtype(the_set: dict, device: str) -> str:
    return the_set["dtype"] if device == "cuda" else "bfloat16"  # the dry run: the project's CPU dtype


def preflight(device: str) -> dict:
    """Versions and the device, first: a missing wheel should cost seconds, not the checkpoint's minutes."""
    import importlib.metadata

    import torch
    import transformers

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda, but torch {torch.__version__} sees no GPU")
    facts = {"device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
             "torch": torch.__version__, "transformers": transformers.__version__}
    for dist in ("bitsandbytes", "torchao"):
        try:
            facts[dist] = importlib.metadata.version(dist)
            __import__(dist)
        except Exception as e:  # noqa: BLE001  (absent, or present but broken against this torch)
            sys.exit(f"{dist} cannot be imported ({type(e).__name__}: {e}); carry its wheel (bash bench/gpu_wheels.sh)")
    print(json.dumps(facts), flush=True)
    return facts


def copy_bandwidth_gb_s(device: str):
    """Device-to-device copy of 4 GiB, bytes read + written per second (median of 5); None on the CPU."""
    import torch

    if device != "cuda":
        return None
    src = torch.empty(1 << 31, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * (1 << 32) / sorted(times[1:])[2] / 1e9


def prompt_ids(device: str):
    import torch

    return torch.tensor([[65, 66, 67, 68] * 8], device=device)


def bare_generate_tok_s(model_dir: Path, dtype, device: str, new_tokens: int) -> float:
    """Decode speed of a plain model.generate loop outside the harness (prefill included: a lower bound)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=256)
    ids = prompt_ids(device)
    model.generate(ids, **kw)
    runs = []
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(new_tokens / (time.perf_counter() - t))
    return sorted(runs)[1]


def quantized_in_memory(model_dir: Path, plan: dict, settings, dtype, device: str):
    from ewq.apply import apply_plan, load_model

    model = load_model(model_dir, dtype)
    apply_plan(model, plan, settings, dtype, progress=False, device=device)
    return model.to(device)


def saved_and_loaded(model_dir: Path, backend: str, dtype, device: str, root: Path) -> dict:
    """A mixed model (blocks raw, 8-bit, 4-bit in turn; 4-bit only where the backend can save it there) quantized
    on the device, saved, loaded back and moved to the device again: its logits must be bit-identical to those
    of the model before saving."""
    import torch

    from ewq.analysis import fingerprint
    from ewq.apply import QuantSettings
    from ewq.artifact import load_quantized, save_quantized
    from ewq.backends import get_backend
    from ewq.checkpoint import open_checkpoint
    from ewq.plan import build_plan
    from ewq.source import load_tokenizer, resolve_model

    source, ckpt = resolve_model(str(model_dir)), open_checkpoint(model_dir)
    fp = fingerprint(ckpt, progress=False)
    cycle = [p for p in ("raw", "8-bit", "4-bit") if not get_backend(backend).cannot_save({p}, device)]
    plan = build_plan(source, ckpt, fp, {"name": "mixed-save-check", "backend": backend},
                      [cycle[i % len(cycle)] for i in range(len(ckpt.blocks))])
    settings = QuantSettings(backend=backend)
    ids = prompt_ids(device)
    with torch.inference_mode():
        model = quantized_in_memory(model_dir, plan, settings, dtype, device)
        want = model(ids).logits.float().cpu()
        saved, _ = save_quantized(model, plan, source, fp, load_tokenizer(model_dir), settings, dtype, root)
        del model
        free_gpu_memory()
        loaded, _, _ = load_quantized(saved)
        got = loaded.to(device)(ids).logits.float().cpu()
    return {"saved_model": str(saved), "plan_counts": plan["counts"], "logits_identical": torch.equal(got, want),
            "logits_max_abs_diff": (got - want).abs().max().item(),
            "greedy_tokens_equal": torch.equal(got.argmax(-1), want.argmax(-1))}


def profile_decode(model_dir: Path, plan_path: str, dtype, device: str, out: Path) -> str:
    """Where EWQ decode time goes: torch.profiler table by kernel for 16 decoded tokens."""
    from torch.profiler import ProfilerActivity, profile

    from ewq.apply import QuantSettings
    from ewq.plan import load_plan

    model = quantized_in_memory(model_dir, load_plan(plan_path), QuantSettings(), dtype, device)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=256)
    model.generate(prompt_ids(device), **kw)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        model.generate(prompt_ids(device), **kw)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    path = out / "profile_ewq_decode.txt"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    return path.name


def compare(by_variant: dict) -> dict:
    """Each variant against the original of the same run (same dtype, same mode): ratios and greedy-token match."""
    orig = next((r for name, r in by_variant.items() if name.startswith("original")), None)
    if orig is None:
        return {}
    out = {}
    for name, r in by_variant.items():
        mem, omem = r["memory"], orig["memory"]
        out[name] = {
            "decode_tok_s": r["speed"]["decode_tok_s_median"], "prefill_s": r["speed"]["prefill_s_median"],
            "decode_tok_s_ratio": r["speed"]["decode_tok_s_median"] / orig["speed"]["decode_tok_s_median"],
            "weight_gb": mem["weight_gb"], "weight_ratio": mem["weight_gb"] / omem["weight_gb"],
            "peak_allocated_gb": mem["peak_allocated_gb"],
            "peak_allocated_ratio": mem["peak_allocated_gb"] / omem["peak_allocated_gb"],
            "driver_process_gb": mem["driver_process_gb"],
            "driver_process_ratio": mem["driver_process_gb"] / omem["driver_process_gb"]
            if mem["driver_process_gb"] and omem["driver_process_gb"] else None,
            "bandwidth_fraction": r["speed"].get("bandwidth_fraction"),
            "compiled_matches_eager": r["speed"].get("compiled_matches_eager"),
            "greedy_token_match": sum(a == b for t, o in zip(r["tests"], orig["tests"])
                                      for a, b in zip(t["token_ids"], o["token_ids"]))
            / max(1, sum(len(o["token_ids"]) for o in orig["tests"]))}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=tuple(SETS), default="bnb", help="which executor and mode (see above)")
    p.add_argument("--config", default=str(REPO / "bench/configs/llama-3.1-8b.json"),
                   help="transformers config of the random checkpoint (default: Llama-3.1-8B's)")
    p.add_argument("--work", default="/tmp/ewq-gpu", help="where the random checkpoint, plans and results go")
    p.add_argument("--out", default=None, help="where the figures are written (default: $OUT, else --work/out)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the whole script")
    p.add_argument("--max-new-tokens", type=int, default=128, help="exactly this many greedy tokens per generation")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per prompt (medians are reported)")
    p.add_argument("--tasks", default="translation", help="suite subset (default: translation, 2 prompts)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="which of ewq, uniform-4bit, uniform-8bit to run after the original (comma-separated; e.g. "
                        "the ones a first call skipped for time)")
    p.add_argument("--budget-s", type=float, default=480,
                   help="seconds this set may take; a step that would not fit is skipped and listed (0: no limit). "
                        "480: three sets back to back fit a session's 30 minutes of device time, each call its 600 s")
    p.add_argument("--in-process", action="store_true",
                   help="run each step's script in this process, not in a process of its own (the CPU dry run of the "
                        "tests: it saves importing torch again per step; on a GPU keep the default, a step's own "
                        "process gives all its memory back to the device when it ends)")
    args = p.parse_args()
    the_set = SETS[args.set]
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}, got '{args.variants}'")
    out = Path(args.out or os.environ.get("OUT") or Path(args.work) / "out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    ckpt, plans, results = work / "checkpoint", work / "plans", work / "results" / args.set
    import torch

    dtype_name = run_dtype(the_set, args.device)
    dtype = getattr(torch, dtype_name)
    summary = {"schema_version": 1, "set": args.set, **the_set, "dtype": dtype_name, "command": " ".join(sys.argv),
               "environment": preflight(args.device), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    log = open(out / "gpu_log.txt", "w")
    steps = Steps(args.budget_s, log, args.in_process)
    files = {}

    def save_outputs():
        summary.update(failed=steps.failed, skipped=steps.skipped, seconds=time.perf_counter() - steps.start)
        by_variant = {r["variant"]: r for r in (json.loads(Path(f).read_text()) for f in files.values())}
        summary["vs_original"] = compare(by_variant)
        write_json_atomic(out / "gpu_summary.json", summary)
        # the device returns at most 8 files: every result JSON travels inside one
        write_json_atomic(out / "gpu_results.json", {Path(f).name: json.loads(Path(f).read_text()) for f in files.values()})

    if not (ckpt / "config.json").exists():
        from ewq.synthetic import save_byte_tokenizer, write_random_checkpoint

        write_random_checkpoint(json.loads(Path(args.config).read_text()), ckpt, device=args.device)
        save_byte_tokenizer(ckpt)
    print(f"checkpoint ready ({time.perf_counter() - steps.start:.0f} s)", flush=True)
    lines = steps.script("plan", ["main_cache_model.py", "--model", str(ckpt), "--out-dir", str(plans), "--no-progress"])
    plan = lines[-1] if lines else None
    summary["plan"] = plan and {k: json.loads(Path(plan).read_text())[k] for k in ("counts", "size")}
    common = ["--model", str(ckpt), "--device", args.device, "--max-new-tokens", str(args.max_new_tokens),
              "--repeats", str(args.repeats), "--tasks", args.tasks, "--out-dir", str(results),
              "--no-progress", "--dtype", dtype_name] + (["--compile"] if the_set["compile"] else ["--eager"])
    lines = steps.script("original", ["benchmark_original.py"] + common)
    if lines:
        files["original"] = lines[-1]
    save_outputs()
    for variant in variants:
        spec = plan if variant == "ewq" else variant
        if spec is None:
            steps.skipped.append("ewq: no plan (the plan step did not finish)")
            continue
        lines = steps.script(variant, ["benchmark.py", "--plan", spec, "--backend", the_set["backend"]] + common)
        if lines:
            files[variant] = lines[-1]
        save_outputs()
    if not the_set["compile"]:
        summary["saved_and_loaded"] = steps.call("saved_and_loaded", saved_and_loaded, ckpt, the_set["backend"], dtype,
                                                 args.device, work / "saved")
    if not the_set["compile"]:
        summary["bare_generate_tok_s"] = steps.call("bare_generate", bare_generate_tok_s, ckpt, dtype, args.device,
                                                    args.max_new_tokens)
    summary["copy_bandwidth_gb_s"] = steps.call("copy_bandwidth", copy_bandwidth_gb_s, args.device, expected_s=5)
    save_outputs()
    ewq = summary["vs_original"].get(json.loads(Path(files["ewq"]).read_text())["variant"]) if "ewq" in files else None
    if the_set["backend"] == "bitsandbytes" and ewq and ewq["decode_tok_s_ratio"] < 1.0:
        summary["profile"] = steps.call("profile", profile_decode, ckpt, plan, dtype, args.device, out)
    if files:
        lines = steps.script("report", ["-m", "ewq.report", "--out-dir", str(work / "report" / args.set)]
                             + list(files.values()), expected_s=10)
        if lines:
            shutil.copy(lines[-1], out)
    save_outputs()
    print(json.dumps(summary, indent=2))
    return 1 if steps.failed else 0


if __name__ == "__main__":
    sys.exit(main())
