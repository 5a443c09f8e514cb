#!/usr/bin/env python
"""Memory while a plan is applied: the float model loaded whole then quantized (apply.load_model + apply_plan, how
benchmark.py worked before) vs the plan applied while loading (apply.load_for_plan, what benchmark.py does now).

Uses the TinyLlama-1.1B-shaped checkpoint of bench/plan_speed.py (random fp16 weights, 2.2 GB, written once into
--dir). Each case runs in its own process, which samples /proc/self/status every 10 ms and reports the peaks of
  RssAnon  memory the process owns (weights it built, temporaries): what the machine must really have;
  RssFile  pages of the memory-mapped safetensors file (page cache: reclaimable, shared, counted in RSS by `ps`);
beside the quantized weight bytes and the largest float block, so the bound of issue 19 (peak <= quantized
weights + the largest float block + 1 GB) can be read off.

    python bench/load_memory.py [--dir /tmp/tinyllama-shapes] [--cases torchao:uniform-8bit,bitsandbytes:uniform-4bit]
    python bench/load_memory.py --cases torchao:raw --max-memory 1GB    # raw blocks that do not fit wait on disk
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from plan_speed import REPO, write_checkpoint

CASES = "torchao:uniform-8bit,bitsandbytes:uniform-8bit,bitsandbytes:uniform-4bit,torch-dynamic:uniform-8bit"

# pasted into a measured child process: peaks of owned (RssAnon) and file-backed (RssFile) memory, sampled every 10 ms
PEAK_SAMPLER = r"""
import threading
peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()
def sample():
    while not done.wait(0.01):
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
        for k in peak:
            peak[k] = max(peak[k], int(status[k].split()[0]) * 1024)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
"""

CHILD = r"""
import json, sys, threading, time
import torch
from ewq.analysis import fingerprint
from ewq.apply import QuantSettings, apply_plan, load_for_plan, load_model, weight_bytes_by_precision
from ewq.checkpoint import open_checkpoint
from ewq.device import pick_dtype
from ewq.plan import builtin_plan
from ewq.source import ModelSource
how, path, backend, plan_name, max_memory = sys.argv[1:6]
max_memory = None if max_memory == "-" else max_memory
ckpt = open_checkpoint(path)
dtype = pick_dtype(None, "cpu", backend, ckpt.kind)
plan = builtin_plan(plan_name, ModelSource(path, ckpt.path), ckpt, fingerprint(ckpt, progress=False),
                    torch.finfo(dtype).bits)
""" + PEAK_SAMPLER + r"""start = time.perf_counter()
settings = QuantSettings(backend=backend)
if how == "whole-then-quantize":
    model = load_model(path, dtype)
    apply_plan(model, plan, settings, dtype, progress=False)
else:
    model, _ = load_for_plan(path, plan, settings, dtype, "decoder", "cpu", max_memory=max_memory, progress=False)
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4]]))
seconds = time.perf_counter() - start
done.set(); sampler.join()
weights = 0 if max_memory else sum(weight_bytes_by_precision(model, plan).values())
bits = torch.finfo(dtype).bits
print(json.dumps({"how": how, "backend": backend, "plan": plan_name, "max_memory": max_memory, "dtype": str(dtype),
                  "seconds": seconds, "peak_anon_gib": peak["RssAnon"] / 2**30, "peak_file_gib": peak["RssFile"] / 2**30,
                  "weight_gib": weights / 2**30,
                  "largest_float_block_gib": max(b.params for b in ckpt.blocks) * bits / 8 / 2**30}))
"""


def run_case(how: str, path: Path, backend: str, plan: str, max_memory) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, how, str(path), backend, plan, max_memory or "-"],
                          capture_output=True, text=True, cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                          "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"{how} {backend} {plan} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/tinyllama-shapes", help="where the 1.1B-shaped checkpoint is (written once)")
    p.add_argument("--cases", default=CASES, help=f"backend:plan,... (default {CASES}); torchao:uniform-4bit is slow "
                                                  f"(HQQ on 1.1B parameters: about 10 minutes per way on 2 cores)")
    p.add_argument("--max-memory", default=None, help="also pass --max-memory to the load-while-quantizing way "
                                                      "(the whole-then-quantize way is then skipped)")
    args = p.parse_args()
    path = Path(args.dir)
    write_checkpoint(path)
    print("| backend | plan | way | s | peak anon GiB | peak file-backed GiB | quantized weights GiB | bound GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        backend, plan = case.split(":")
        ways = ["while-loading"] if args.max_memory else ["whole-then-quantize", "while-loading"]
        for how in ways:
            r = run_case(how, path, backend, plan, args.max_memory)
            bound = r["weight_gib"] + r["largest_float_block_gib"] + 1 if r["weight_gib"] else float("nan")
            print(f"| {backend} | {plan}{' --max-memory ' + args.max_memory if args.max_memory else ''} | {how} | "
                  f"{r['seconds']:.0f} | {r['peak_anon_gib']:.2f} | {r['peak_file_gib']:.2f} | {r['weight_gib']:.2f} | "
                  f"{bound:.2f} |", flush=True)
    print("bound: quantized weights + the largest float block + 1 GiB (issue 19); anon: memory the process owns; "
          "file-backed: the mapped checkpoint (page cache, reclaimable)")


if __name__ == "__main__":
    main()
