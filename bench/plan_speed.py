#!/usr/bin/env python
"""Plan-generation speed and memory: EWQ's streaming analysis vs the published PoC's method, side by side.

Writes a checkpoint with TinyLlama-1.1B's shapes and random fp16 weights (once, into --dir), then runs
each method in its own subprocess so peak memory is measured per method:
  poc:  AutoModelForCausalLM.from_pretrained (the whole model in RAM), then np.histogram(bins=128)
        over every nn.Linear weight of every block;
  ewq:  ewq.analysis.analyze (one tensor at a time through safetensors, fp16 bit-pattern counts).
Prints seconds, parameters/s, the speed-up, and peak RSS above the interpreter's baseline.

    python bench/plan_speed.py [--dir /tmp/tinyllama-shapes]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                 max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 hidden_act="silu", rope_theta=10000.0)


def write_checkpoint(directory: Path) -> None:
    from ewq.synthetic import write_random_checkpoint

    if not (directory / "config.json").exists():
        write_random_checkpoint(TINYLLAMA, directory, shard_bytes=1e12)  # one file, as TinyLlama ships


CHILD = r"""
import json, sys, time, resource
import torch
torch.set_num_threads(2)
method, path = sys.argv[1], sys.argv[2]
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if method == "poc":
    import numpy as np
    from transformers import AutoModelForCausalLM
    from ewq.entropy import poc_histogram_entropy
    base = rss(); t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    params = 0
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                poc_histogram_entropy(m.weight); params += m.weight.numel()
else:
    from ewq.analysis import analyze
    from ewq.checkpoint import open_checkpoint
    base = rss(); t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    a = analyze(ckpt, "histogram", progress=False)
    params = sum(b.params for b in ckpt.blocks)
print(json.dumps({"method": method, "seconds": time.perf_counter() - t0, "block_params": params,
                  "peak_rss_above_baseline_gb": (rss() - base) / 1e9}))
"""


def run(method: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(path)], capture_output=True, text=True, cwd=REPO,
                         check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/ewq-tinyllama-shapes", help="where the random checkpoint is written (2.2 GB)")
    args = p.parse_args()
    path = Path(args.dir)
    t = time.perf_counter()
    write_checkpoint(path)
    print(f"checkpoint {path} ready ({time.perf_counter() - t:.0f} s)")
    run("ewq", path)  # warm the page cache so both methods read from memory, not disk
    results = {m: run(m, path) for m in ("ewq", "poc")}
    from ewq.checkpoint import open_checkpoint
    ckpt = open_checkpoint(path)
    largest_tensor = max(t.numel for t in ckpt.tensors) * 2
    for r in results.values():
        print(f"{r['method']:>4}: {r['seconds']:7.2f} s  {r['block_params'] / r['seconds'] / 1e6:8.1f} M params/s  "
              f"peak RSS above baseline {r['peak_rss_above_baseline_gb']:.3f} GB")
    speedup = results["poc"]["seconds"] / results["ewq"]["seconds"]
    print(f"speed-up ewq vs poc: {speedup:.1f}x (target >= 20x)")
    print(f"largest tensor {largest_tensor / 1e9:.3f} GB; memory bound 2x largest + 0.3 GB = {2 * largest_tensor / 1e9 + 0.3:.3f} GB")


if __name__ == "__main__":
    main()
