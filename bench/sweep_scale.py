#!/usr/bin/env python
"""How the sensitivity sweep scales: memory and time against the model's size (issue 25).

Sweeps checkpoints with real shapes, each in its own process from an empty cache, with
`main_cache_model.py --method sensitivity --granularity matrix --backend llama.cpp` (plan included: analysis, the
fast sweep, the whole-plan checks), sampling /proc/self/status every 20 ms:
  smollm2-135m  the embedded SmolLM2-135M (real weights, bf16);
  1.1b          TinyLlama-1.1B's shapes, random fp16 weights (2.2 GB), byte-level tokenizer;
  8b            Llama-3.1-8B's shapes (128k vocabulary, 4096 wide, 14336 MLP), random weights, but only --blocks-8b
                blocks (the whole 8B is 16 GB of disk and an hour of sweep): it is swept with 1 and with --blocks-8b
                blocks, and the full 32 blocks are extrapolated from the difference (time per block) - said so in the
                table. Memory does not grow with blocks (one at a time), so the measured peak stands.
Prints a table: parameters, checkpoint GB, owned (anonymous) peak GB, peak RSS (owned + mapped file pages) GB, wall
seconds, seconds per billion parameters. Random weights are valid for time and memory, never for quality.

    python bench/sweep_scale.py [--dir /tmp/ewq-sweep-scale] [--models smollm2-135m,1.1b,8b] [--blocks-8b 2] [--ggml-lib both]
"""

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from load_memory import PEAK_SAMPLER  # noqa: E402
from plan_speed import TINYLLAMA  # noqa: E402

LLAMA_3_1_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", rope_theta=500000.0)

CHILD = PEAK_SAMPLER + r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from ewq.planning import make_plan
model, out_dir, bits = sys.argv[1], sys.argv[2], float(sys.argv[3])
start = time.perf_counter()
path, plan, _ = make_plan(model, method="sensitivity", granularity="matrix", backend="llama.cpp", target_bits=bits,
                          out_dir=out_dir, progress=False)
seconds = time.perf_counter() - start
done.set()
print(json.dumps({"seconds": seconds, "owned_peak_gb": peak["RssAnon"] / 1e9,
                  "rss_peak_gb": (peak["RssAnon"] + peak["RssFile"]) / 1e9, "plan": str(path),
                  "measured_kl": plan["checks"]["measured_kl"], "blocks": plan["model"]["block_count"],
                  "rounding": plan["run"].get("ggml_rounding"), "sweep_s": plan["run"].get("sensitivity_s"),
                  "checks_s": plan["run"].get("checks_s")}))
"""


def write_shapes(config: dict, directory: Path, blocks: int | None = None) -> Path:
    """A checkpoint with these shapes and random fp16 weights (written once), with a byte-level tokenizer."""
    from ewq.synthetic import save_byte_tokenizer, write_random_checkpoint

    config = {**config, **({"num_hidden_layers": blocks} if blocks else {})}
    if not (directory / "config.json").exists():
        write_random_checkpoint(config, directory, shard_bytes=4e9)
        save_byte_tokenizer(directory)
    return directory


def sweep(model: str, threads: int, bits: float, ggml_lib: str = "auto") -> dict:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           **({"EWQ_GGML_LIB": "off"} if ggml_lib == "off" else {})}  # (ewq.ggml_native)
    with tempfile.TemporaryDirectory(prefix="ewq-sweep-") as out_dir:  # an empty cache: nothing reused
        done = subprocess.run([sys.executable, "-c", CHILD, model, out_dir, str(bits), str(threads)], cwd=REPO,
                              capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"sweep of {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_facts(path) -> dict:
    from ewq.checkpoint import open_checkpoint
    from ewq.source import resolve_model

    ckpt = open_checkpoint(resolve_model(str(path), REPO / "models").path)
    params = sum(t.numel for t in ckpt.tensors)
    size = sum(t.numel * {"F32": 4, "F16": 2, "BF16": 2}.get(t.dtype, 2) for t in ckpt.tensors)
    return {"params": params, "block_params": ckpt.blocks[0].params, "blocks": len(ckpt.blocks), "checkpoint_gb": size / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/ewq-sweep-scale", help="where the random checkpoints are written (1.1b: 2.2 "
                                                                "GB; 8b with 2 blocks: 3 GB)")
    p.add_argument("--models", default="smollm2-135m,1.1b,8b", help="which to sweep, comma-separated")
    p.add_argument("--blocks-8b", type=int, default=2, help="blocks of the 8B-shaped checkpoint actually swept (>= 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--target-bits", type=float, default=5.0, help="the plan's size (default 5.0 bits per weight)")
    p.add_argument("--ggml-lib", default="auto", choices=("auto", "off", "both"),
                   help="ggml's rounding: auto (default: ggml's own C where llama-cpp-python 0.3.36 or bench's tools "
                        "are installed, ewq.ggml_native), off (the torch emulation), both (each checkpoint twice, "
                        "emulation first, to compare side by side)")
    args = p.parse_args()
    if args.blocks_8b < 2:
        p.error("--blocks-8b must be at least 2 (the time per block is the difference of two sweeps)")
    root = Path(args.dir)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "smollm2-135m":
            cases = [("smollm2-135m", "smollm2-135m")]
        elif name == "1.1b":
            cases = [("1.1b (TinyLlama shapes)", write_shapes(TINYLLAMA, root / "tinyllama-1.1b"))]
        elif name == "8b":
            cases = [(f"8b shapes, {n} block{'s' if n > 1 else ''}", write_shapes(LLAMA_3_1_8B, root / f"llama-8b-{n}", n))
                     for n in (1, args.blocks_8b)]
        else:
            raise SystemExit(f"unknown model '{name}'; choose from smollm2-135m, 1.1b, 8b")
        for (label, path), lib in itertools.product(cases, ("off", "auto") if args.ggml_lib == "both" else
                                                     (args.ggml_lib,)):
            t = time.perf_counter()
            facts = checkpoint_facts(path)
            result = sweep(str(path), args.threads, args.target_bits, lib)
            label = f"{label}{', emulated' if lib == 'off' else ', ggml C' if 'C' in str(result['rounding']) else ''}"
            rows.append({"model": label, **facts, **result})
            print(f"{label}: {result['seconds']:.0f} s (sweep {result['sweep_s']} s, checks {result['checks_s']} s; "
                  f"{result['rounding']}), owned peak {result['owned_peak_gb']:.2f} GB "
                  f"({time.perf_counter() - t:.0f} s with start-up)", file=sys.stderr, flush=True)
    small = [r for r in rows if r["model"].startswith("8b shapes, 1 block")]
    big = [r for r in rows if r["model"].startswith("8b shapes") and r not in small]
    if small and big:  # the full 8B: what one block adds (time, parameters, bytes), times 31, on top of one block
        one, more = small[0], big[0]

        def per_block(field):
            return (more[field] - one[field]) / (more["blocks"] - 1)

        rows.append({**more, "model": "8b shapes, 32 blocks (extrapolated)", "blocks": 32,
                     **{f: one[f] + 31 * per_block(f) for f in ("seconds", "params", "checkpoint_gb")}})
    print(f"\n{'checkpoint':<40} {'params':>8} {'ckpt GB':>8} {'owned peak GB':>14} {'peak RSS GB':>12} "
          f"{'wall s':>8} {'s / B params':>13}")
    for r in rows:
        print(f"{r['model']:<40} {r['params'] / 1e9:7.2f}B {r['checkpoint_gb']:8.2f} {r['owned_peak_gb']:14.2f} "
              f"{r['rss_peak_gb']:12.2f} {r['seconds']:8.0f} {r['seconds'] / (r['params'] / 1e9):13.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
