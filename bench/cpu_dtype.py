#!/usr/bin/env python
"""Why bfloat16 is the CPU default: SmolLM2 prefill and decode in float32 vs bfloat16, side by side.

    python bench/cpu_dtype.py
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main():
    import statistics

    import torch

    from ewq.apply import load_model
    from ewq.generate import encode_prompt, generate_exact, load_suite
    from ewq.source import resolve_model
    from transformers import AutoTokenizer

    path = resolve_model("smollm2-135m", REPO / "models").path
    tok = AutoTokenizer.from_pretrained(path)
    ids = encode_prompt(tok, load_suite(["technical_explanation"])[1]["prompt"])
    models = {dt: load_model(path, dt) for dt in (torch.float32, torch.bfloat16)}
    runs = {dt: [] for dt in models}
    for _ in range(2):  # interleaved rounds, so drift hits both dtypes alike
        for dt, model in models.items():
            generate_exact(model, ids, 4, "cpu", clock=False)
            runs[dt] += [generate_exact(model, ids, 32, "cpu") for _ in range(3)]
    print(f"prompt {ids.shape[1]} tokens, 32 new tokens, 6 runs each, median")
    for dt, r in runs.items():
        print(f"{str(dt):>15}: prefill {statistics.median(x[0] for x in r):.3f} s, "
              f"decode {statistics.median(31 / x[1] for x in r):.1f} tok/s")


if __name__ == "__main__":
    main()
