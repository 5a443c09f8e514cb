#!/usr/bin/env python
"""A copy of a checkpoint moved off the 4-bit grid it came from, to judge formats that would re-find that grid.

The embedded SmolLM2 was converted from a GGUF Q4_1 file: every weight of its block matrices sits on a Q4_1 grid
(blocks of 32 along a row, value = min + scale x q, q in 0..15). Formats with blocks of 32 and a float minimum (Q4_1,
Q5_1, and Q5_K's 32-wide sub-blocks with their own minimum) re-find that grid and look near-lossless on it; the
formats without a minimum do not. The models people download did not go through Q4_1, so a comparison at Q5_K_M's
size on SmolLM2 says more about its history than about the method. This script writes a copy in which each weight
of the block matrices (and the token embeddings) gets Gaussian noise of `--noise` x its 32-block's Q4_1 step
((max - min) / 15), fixed seed: off the grid, the same model otherwise (same shapes, tokenizer, config). It prints,
before and after, the mean distance of a weight to its block's Q4_1 grid in steps (0 on the grid, ~0.25 for weights
with no grid) and the relative change of the weights.

    python bench/off_grid.py --model models/smollm2-135m --out models/smollm2-135m-off-grid [--noise 0.3]

Then, e.g.: python bench/llamacpp.py --model models/smollm2-135m-off-grid --presets Q5_K_M,Q8_0 ...
The copy is a different model (a little worse as a language model): compare files made from it with each other,
never with files made from the original.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ewq.analysis import GRID_BLOCK, q4_1_grid_distance, q4_1_steps  # noqa: E402
from ewq.common import EWQError, run_cli  # noqa: E402


def off_grid(weight: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    blocks, _, step = q4_1_steps(weight)
    moved = blocks + torch.randn(blocks.shape, generator=generator) * step * noise
    return moved.reshape(weight.shape).to(weight.dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m", help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="directory to write the copy to (must not exist)")
    p.add_argument("--noise", type=float, default=0.3,
                   help="noise sd in units of each 32-block's Q4_1 step (default 0.3: a uniform spread over one step "
                        "has sd 0.29)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    src, out = Path(args.model), Path(args.out)
    if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
        raise EWQError(f"{src} is not a checkpoint directory (config.json + *.safetensors)")
    if out.exists():
        raise EWQError(f"{out} exists; give a new directory (nothing is overwritten)")
    if args.noise <= 0:
        raise EWQError(f"--noise must be > 0 (got {args.noise})")
    generator = torch.Generator().manual_seed(args.seed)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = {"moved": 0, "kept": 0, "before": [], "after": [], "relative_change": []}
    for path in sorted(src.iterdir()):
        if path.name == "metadata.json":  # EWQ's description of the checkpoint: no longer the source's weights
            meta = json.loads(path.read_text())
            meta.pop("fingerprint", None)
            meta.update(base_model=f"{meta.get('base_model') or src}, moved off its Q4_1 grid (bench/off_grid.py, "
                                   f"noise {args.noise} steps, seed {args.seed})", source="off-grid copy")
            (tmp / path.name).write_text(json.dumps(meta, indent=2))
            continue
        if path.suffix != ".safetensors":
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
            continue
        tensors = {}
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                weight = f.get_tensor(name)
                # the matrices GGUF quantized: 2-D, rows of whole 32-blocks (norms stayed float in the GGUF)
                if weight.dim() == 2 and weight.shape[1] % GRID_BLOCK == 0:
                    moved = off_grid(weight, args.noise, generator)
                    stats["before"].append(q4_1_grid_distance(weight))
                    stats["after"].append(q4_1_grid_distance(moved))
                    stats["relative_change"].append(float((moved.float() - weight.float()).norm() / weight.float().norm()))
                    stats["moved"] += 1
                    weight = moved
                else:
                    stats["kept"] += 1
                tensors[name] = weight.contiguous()
        save_file(tensors, str(tmp / path.name), metadata=metadata)
    (tmp / "off_grid.json").write_text(json.dumps({
        "schema_version": 1, "source": str(src), "noise_steps": args.noise, "seed": args.seed,
        "matrices_moved": stats["moved"], "tensors_kept": stats["kept"],
        "mean_grid_distance_steps_before": sum(stats["before"]) / len(stats["before"]),
        "mean_grid_distance_steps_after": sum(stats["after"]) / len(stats["after"]),
        "mean_relative_change": sum(stats["relative_change"]) / len(stats["relative_change"])}, indent=2))
    tmp.rename(out)
    print((out / "off_grid.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
