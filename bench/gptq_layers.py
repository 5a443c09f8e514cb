#!/usr/bin/env python
"""Does GPTQ's rounding (ewq.gptq) beat llama-quantize --imatrix's on text it never saw? Matrix by matrix.

    python bench/gptq_layers.py --model /tmp/offgrid/smollm2-135m-off-grid [--calib-tokens 768,12288]
                                [--layers 3,15,27] [--formats Q4_0,IQ4_NL,Q3_K,Q4_K,Q6_K] [--out FILE.json]

For a few blocks' q_proj, o_proj, up_proj and down_proj: the inputs each matrix sees on calibration text (the end
of lee_background.cor, as EWQ's sweep and GPTQ take it) and on evaluation text (its start, 1024 tokens); each
format's round trip as llama-quantize --imatrix writes it (the importance = the calibration inputs' mean square)
and as ewq.gptq rounds it (the same importance for the scales, H from the calibration inputs). Prints and writes
the relative output error ||(W - Q) X^T||^2 / ||W X^T||^2 on both texts, per matrix and format, and the median
ratio GPTQ / llama-quantize on the evaluation text per format and calibration size. Weights from a model moved off
any grid (bench/off_grid.py) for formats SmolLM2's Q4_1 history would favour.
"""

import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ewq.common import ArgumentParser, EWQError, run_cli, write_json_atomic  # noqa: E402

MATRICES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def inputs(model, windows, names) -> dict:
    """{matrix name: its inputs [tokens, cols]} over the windows."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
        for n in names]
    try:
        with torch.no_grad():
            for w in windows.split(1):
                model(w)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def relative_error(w, q, x) -> float:
    return (((w - q) @ x.T).square().sum() / (w @ x.T).square().sum()).item()


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--calib-tokens", default="768,12288", help="calibration sizes compared (default 768,12288)")
    p.add_argument("--layers", default="3,15,27", help="block indices (default 3,15,27)")
    p.add_argument("--formats", default="Q4_0,IQ4_NL,Q3_K,Q4_K,Q6_K",
                   help="ggml types (k-quants only where a matrix's rows are whole blocks of 256)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from ewq import ggml_quants, gptq
    from ewq.quality import load_corpus, make_windows
    from ewq.source import load_tokenizer

    path = Path(args.model)
    if not path.is_dir():
        raise EWQError(f"--model {path}: no such checkpoint directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok, corpus = load_tokenizer(path), load_corpus()
    names = [f"model.layers.{i}.{m}" for i in map(int, args.layers.split(",")) for m in MATRICES]
    unseen = inputs(model, make_windows(tok, corpus, 1024, 256), names)
    rows, ratios = [], {}
    for n_cal in map(int, args.calib_tokens.split(",")):
        calib = inputs(model, make_windows(tok, corpus, n_cal, 256, from_end=True), names)
        for name in names:
            w = model.get_submodule(name).weight.detach().float()
            x = calib[name]
            importance = x.square().mean(0)
            factor = gptq.inverse_factor(x.T @ x / x.shape[0])
            for fmt in args.formats.split(","):
                if not ggml_quants.can_quantize(w.shape, fmt):
                    continue
                nearest = ggml_quants.quantize_dequantize(w, fmt, importance=importance)
                _, fed = gptq.gptq_round(w, fmt, factor, importance)
                row = {"calib_tokens": n_cal, "matrix": name, "format": fmt,
                       "llama_quantize_eval": relative_error(w, nearest, unseen[name]),
                       "gptq_eval": relative_error(w, fed, unseen[name]),
                       "llama_quantize_calib": relative_error(w, nearest, x), "gptq_calib": relative_error(w, fed, x)}
                row["gptq_vs_llama_quantize_eval"] = row["gptq_eval"] / row["llama_quantize_eval"]
                rows.append(row)
                ratios.setdefault((n_cal, fmt), []).append(row["gptq_vs_llama_quantize_eval"])
                print(f"{n_cal:6d} {name:32s} {fmt:7s} eval {row['llama_quantize_eval']:.2e} -> {row['gptq_eval']:.2e} "
                      f"({row['gptq_vs_llama_quantize_eval']:.2f}x); calibration {row['llama_quantize_calib']:.2e} -> "
                      f"{row['gptq_calib']:.2e}", flush=True)
    summary = [{"calib_tokens": c, "format": f, "median": statistics.median(v), "min": min(v), "max": max(v),
                "matrices": len(v)} for (c, f), v in ratios.items()]
    print("\n| calibration tokens | format | GPTQ / llama-quantize --imatrix, output error on unseen text: median (min-max) |")
    print("|---:|---|---|")
    for s in summary:
        print(f"| {s['calib_tokens']} | {s['format']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}, {s['matrices']} matrices) |")
    if args.out:
        write_json_atomic(args.out, {"schema_version": 1, "model": str(path), "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
