#!/usr/bin/env python
"""Time and memory of GPTQ rounding (ewq.gptq) on one Llama-3.1-8B block's largest matrices, random weights.

    python bench/gptq_scale.py [--tokens 2048] [--format Q4_K]

down_proj (4096 x 14336: the 14336-wide inverse factor) and up_proj (14336 x 4096: the most rows): X^T X of random
inputs, its inverse Cholesky factor (ewq.gptq.inverse_factor, float64) and the rounding (gptq_round). Prints the
seconds of each and the process's peak RSS. Random weights and inputs are fine for time and memory, never for quality.
"""

import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ewq.common import ArgumentParser, run_cli  # noqa: E402

SHAPES = (("down_proj", 4096, 14336), ("up_proj", 14336, 4096))


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="random input rows for X^T X (default 2048)")
    p.add_argument("--format", default="Q4_K", help="ggml type (default Q4_K)")
    args = p.parse_args(argv)
    from ewq import gptq

    torch.manual_seed(0)
    for name, rows, cols in SHAPES:
        start = time.perf_counter()
        x = torch.randn(args.tokens, cols)
        factor = gptq.inverse_factor((x.T @ x).double() / args.tokens)
        del x
        factored = time.perf_counter()
        gptq.gptq_round(torch.randn(rows, cols) * 0.02, args.format, factor, torch.ones(cols))
        done = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"{name} {rows}x{cols} {args.format}: X^T X and factor {factored - start:.0f} s, rounding "
              f"{done - factored:.0f} s, peak RSS so far {peak:.2f} GB", flush=True)
        del factor
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
