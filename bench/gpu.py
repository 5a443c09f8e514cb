#!/usr/bin/env python
"""GPU figures in one device call: EWQ vs FP16 vs uniform 8/4-bit on a checkpoint with Llama-3.1-8B's shapes.

On the GPU machine (no network there), this script
  1. writes a checkpoint with the exact Llama-3.1-8B configuration (bench/configs/llama-3.1-8b.json) and random
     fp16 weights, plus a byte-level tokenizer: valid for speed and memory, not for quality;
  2. runs main_cache_model.py on it, then benchmark_original.py, benchmark.py with the EWQ plan, and the
     uniform-8bit and uniform-4bit baselines, all with the same suite, --max-new-tokens and --repeats;
  3. measures the device's copy bandwidth (a large device-to-device copy), the decode speed of a bare FP16
     model.generate loop outside the harness, and a torch.profiler summary by kernel of EWQ decoding;
  4. writes the report and copies the result JSONs, the report and a summary to --out ($OUT on the device).

bitsandbytes is not installed on the GPU machine: carry its wheel (see docs/RESULTS.md, "GPU figures").
    python bench/gpu.py --out "$OUT"                   # defaults sized to fit one 10-minute device call
    python bench/gpu.py --config tiny.json --device cpu --max-new-tokens 4 --repeats 1   # a dry run here
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sh(argv, log):
    """Run one of the project's scripts; return the last line of its stdout (the path it wrote)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable] + argv, cwd=REPO, capture_output=True, text=True)
    log.write(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr[-3000:]}\n({time.perf_counter() - start:.0f} s)\n")
    log.flush()
    print("\n".join(proc.stdout.strip().splitlines()[-3:]), flush=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def copy_bandwidth_gb_s(device: str) -> float:
    """Device-to-device copy of 4 GiB, bytes read + written per second (median of 5)."""
    import torch

    if device != "cuda":
        return float("nan")
    src = torch.empty(1 << 31, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 32) / sorted(times[1:])[2] / 1e9


def bare_generate_tok_s(model_dir: Path, device: str, new_tokens: int) -> float:
    """FP16 decode speed of a plain model.generate loop, outside the harness."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor([[65, 66, 67, 68] * 8], device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=256)
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
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return sorted(runs)[1]


def profile_decode(model_dir: Path, plan: str, device: str, out: Path) -> None:
    """Where EWQ decode time goes: torch.profiler table by kernel for 16 decoded tokens."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ewq.apply import QuantSettings, apply_plan, load_model
    from ewq.plan import load_plan

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = load_model(model_dir, dtype)
    apply_plan(model, load_plan(plan), QuantSettings(), dtype, progress=False)
    model.to(device)
    ids = torch.tensor([[65, 66, 67, 68] * 8], device=device)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=256)
    model.generate(ids, **kw)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        model.generate(ids, **kw)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    (out / "profile_ewq_decode.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=30))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "bench/configs/llama-3.1-8b.json"))
    p.add_argument("--work", default="/tmp/ewq-gpu", help="where the random checkpoint, plans and results go")
    p.add_argument("--out", default=None, help="where the figures are copied (default: $OUT, else --work/out)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", default="translation",
                   help="suite subset (default: translation, 2 prompts, so a set of variants fits one 10-minute call)")
    p.add_argument("--set", choices=("eager", "compiled", "all"), default="eager",
                   help="eager: original, the EWQ plan and uniform 8/4-bit with bitsandbytes and with torchao; "
                        "compiled: original and the torchao variants with --compile (static cache + torch.compile); "
                        "all: both (longer than one 10-minute device call on an 8B model)")
    args = p.parse_args()
    import os

    out = Path(args.out or os.environ.get("OUT") or Path(args.work) / "out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    ckpt, plans, results = work / "checkpoint", work / "plans", work / "results"
    log = open(out / "gpu_log.txt", "w")
    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        from ewq.synthetic import save_byte_tokenizer, write_random_checkpoint

        write_random_checkpoint(json.loads(Path(args.config).read_text()), ckpt, device=args.device)
        save_byte_tokenizer(ckpt)
    print(f"checkpoint ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    common = ["--model", str(ckpt), "--device", args.device, "--max-new-tokens", str(args.max_new_tokens),
              "--repeats", str(args.repeats), "--tasks", args.tasks, "--out-dir", str(results), "--no-progress"]
    plan = sh(["main_cache_model.py", "--model", str(ckpt), "--out-dir", str(plans), "--no-progress"], log)
    files = []
    compiled = [[]] if args.set == "eager" else [["--compile"]] if args.set == "compiled" else [[], ["--compile"]]
    for extra in compiled:
        files.append(sh(["benchmark_original.py"] + common + extra, log))
        backends = ["torchao"] + ([] if extra else ["bitsandbytes"])  # bitsandbytes does not compile
        for backend in backends:
            for variant in (plan, "uniform-8bit", "uniform-4bit"):
                files.append(sh(["benchmark.py", "--plan", variant, "--plans-dir", str(plans), "--backend", backend]
                                + common + extra, log))
    report = sh(["-m", "ewq.report", "--out-dir", str(results)] + files, log)
    summary = {"copy_bandwidth_gb_s": copy_bandwidth_gb_s(args.device),
               "bare_generate_fp16_tok_s": bare_generate_tok_s(ckpt, args.device, args.max_new_tokens),
               "command": " ".join(sys.argv), "seconds": time.perf_counter() - t0}
    by_kind = {json.loads(Path(f).read_text())["variant"]: json.loads(Path(f).read_text()) for f in files}
    summary["vs_original"] = {}
    for name, r in by_kind.items():  # each variant against the original of the same mode (eager / compiled)
        orig = by_kind["original+compile" if name.endswith("+compile") else "original"]
        summary["vs_original"][name] = {
            "peak_allocated_ratio": r["memory"]["peak_allocated_gb"] / orig["memory"]["peak_allocated_gb"],
            "driver_process_ratio": (r["memory"]["driver_process_gb"] or 0) / (orig["memory"]["driver_process_gb"] or 1),
            "decode_tok_s_ratio": r["speed"]["decode_tok_s_median"] / orig["speed"]["decode_tok_s_median"],
            "bandwidth_fraction": r["speed"].get("bandwidth_fraction"),
            "greedy_token_match": sum(a == b for t, o in zip(r["tests"], orig["tests"])
                                      for a, b in zip(t["token_ids"], o["token_ids"]))
                                  / max(1, sum(len(o["token_ids"]) for o in orig["tests"]))}
    ewq_bnb = next((k for k in by_kind if k.startswith("ewq") and "@" not in k), None)
    if ewq_bnb and summary["vs_original"][ewq_bnb]["decode_tok_s_ratio"] < 1.0:
        profile_decode(ckpt, plan, args.device, out)
    (out / "gpu_summary.json").write_text(json.dumps(summary, indent=2))
    # the device returns at most 8 files: every result JSON goes back inside one file
    (out / "gpu_results.json").write_text(json.dumps({Path(f).name: json.loads(Path(f).read_text()) for f in files}))
    shutil.copy(report, out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
