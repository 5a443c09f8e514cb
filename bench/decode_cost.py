"""Decode cost per ggml format: how long llama.cpp's CPU kernels take per weight, format by format.

A plan sized by a llama-quantize preset is also held to the preset's decode speed (python -m ewq.export gguf --target
PRESET, --speed preset): the planner sums, over the matrices a token is multiplied through, weights x the time per
weight of their format, ewq.backends.llamacpp.DECODE_COST. This measures that table on this machine:

1. a random checkpoint with TinyLlama-1.1B's widths (rows of 2048 and 5632: whole blocks of every format, k-quants
   included), --layers blocks and tied embeddings, with the embedded SmolLM2's tokenizer so llama.cpp loads it
   (random weights: fine for time, never for quality);
2. its BF16 GGUF with EWQ's exporter, then one file per format with `llama-quantize --pure` (every matrix that type;
   F16 too, the type of an fp16 checkpoint's unquantized matrices);
3. tg64 of every file with llama-bench at each thread count, in interleaved rounds.

It prints each format's median tok/s, ms per token and time per token relative to Q4_0's at each thread count (the files have
the same weights, so that is the time per weight; the fixed part of a token, attention and norms, is in every file and
pulls the ratios towards 1), and writes decode_cost.json. Run it quiet: other jobs on the cores move the figures.

    python bench/decode_cost.py --llama-bin ~/.cache/ewq/llama.cpp-0.3.36/build/bin
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.llamacpp import (DEFAULT_CACHE, REPO, build_tools, cpu_info, export_reference, log, make_imatrix,
                            measure_speed, reused, run)
from ewq.backends.llamacpp import DECODE_COST, parse_formats
from ewq.common import ArgumentParser, EWQError, run_cli, write_json_atomic
from ewq.ggml_types import NEEDS_IMPORTANCE
from ewq.presets import NEEDS_IMATRIX

TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64,
             "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
             "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16"}
FORMATS = "Q8_0,Q6_K,Q5_K,Q4_K,Q5_0,Q4_0,Q5_1,Q4_1,IQ4_NL,IQ4_XS,Q3_K,Q2_K,IQ3_XXS,IQ3_S,IQ2_XS"


def with_embedding_entry(imatrix: Path, out: Path) -> Path:
    """A copy of the importance matrix with entries for the token embeddings and the output head, which llama-imatrix
    does not collect by default: `llama-quantize --pure` to a type ggml rounds only with importance (IQ2_XS) gives
    them that type too and would abort without one. For timing only: the entries copy a layer's of the same width."""
    from ewq.imatrix import load_imatrix, save_imatrix

    im = load_imatrix(imatrix)
    source = next(n for n in im.sums if n.endswith("attn_q.weight"))  # input width = the hidden size, as the table
    for name in ("token_embd.weight", "output.weight"):
        im.sums[name], im.counts[name] = im.sums[source], im.counts[source]
    return save_imatrix(im, out)


def parse_args(argv=None):
    p = ArgumentParser(prog="python bench/decode_cost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(REPO / "benchmark_results" / "decode_cost"),
                   help="the checkpoint, the GGUF files and decode_cost.json go here (about 4 GB for 6 layers)")
    p.add_argument("--layers", type=int, default=6, help="transformer blocks of the random checkpoint (default 6)")
    p.add_argument("--formats", default=FORMATS, help=f"ggml types measured, comma-separated (default {FORMATS})")
    p.add_argument("--threads", default="1,2", help="llama-bench -t, a comma list measured side by side (default 1,2)")
    p.add_argument("--n-gen", type=int, default=64, help="llama-bench -n (default 64: tg64)")
    p.add_argument("--repetitions", type=int, default=2, help="llama-bench -r (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="llama-bench calls per file, interleaved (default 2)")
    p.add_argument("--reuse", action="store_true", help="measure files an earlier run left in --out-dir as they are")
    p.add_argument("--llama-bin", default=None, help="use llama.cpp binaries already built in DIR")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the tools are built (as bench/llamacpp.py)")
    p.add_argument("--sdist", default=None, help="the llama-cpp-python sdist to build from (as bench/llamacpp.py)")
    return p.parse_args(argv)


def checkpoint(out: Path, layers: int) -> Path:
    """The random 1.1B-shaped checkpoint (written once) with SmolLM2's tokenizer files."""
    from ewq.synthetic import write_random_checkpoint

    model = out / "model"
    if not (model / "config.json").is_file():
        smol = REPO / "models" / "smollm2-135m"
        if not (smol / "tokenizer.json").is_file():
            raise EWQError(f"{smol} has no tokenizer.json: run python main_cache_model.py once (it converts the "
                           f"embedded model), then again")
        config = {**TINYLLAMA, "num_hidden_layers": layers,
                  "vocab_size": json.loads((smol / "config.json").read_text())["vocab_size"]}
        write_random_checkpoint(config, model)
        for f in smol.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, model / f.name)
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    formats = parse_formats(args.formats)
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise EWQError(f"--threads takes a comma list of thread counts, got {args.threads!r}") from None
    if args.layers < 1 or min(args.threads) < 1 or args.rounds < 1 or args.repetitions < 1:
        raise EWQError("--layers, --threads, --rounds and --repetitions must be at least 1")
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bin_dir, _ = build_tools(args)
    model = checkpoint(out, args.layers)
    reference = export_reference(model, out / "bf16.gguf", "BF16", args)
    rows = [{"name": "BF16", "file": reference}]
    # llama-quantize refuses some types without an importance matrix; for timing any will do: llama-imatrix on the
    # repository's README with the random model
    imatrix = make_imatrix(bin_dir, reference, REPO / "README.md", out / "imatrix.gguf", 2, args) \
        if set(formats) & set(NEEDS_IMATRIX) else None
    if set(formats) & set(NEEDS_IMPORTANCE):  # --pure gives the token embeddings IQ2_XS too: ggml needs their entry
        imatrix = with_embedding_entry(imatrix, out / "imatrix-embd.gguf")
    for f in ("F16", *formats):  # F16: what a plan's "raw" matrices are written in for an fp16 checkpoint
        pure = out / f"pure-{f}.gguf"
        if not reused(pure, args):
            log(f"llama-quantize --pure {f}")
            extra = ["--imatrix", imatrix] if f in NEEDS_IMATRIX else []
            part = pure.with_name(pure.name + ".part")  # a run that fails leaves no file --reuse would take
            run([bin_dir / "llama-quantize", "--pure", *extra, reference, part, f, 2], f"llama-quantize --pure {f}")
            part.replace(pure)
        rows.append({"name": f, "file": pure})
    build = measure_speed(rows, bin_dir, args)
    # medians over every sample of every round: one round disturbed by another job moves a mean, not a median
    base = {s["threads"]: s["tg_tok_s_median"] for s in next(r for r in rows if r["name"] == "Q4_0")["speed"]} \
        if "Q4_0" in formats else None
    table = []
    for r in rows:
        speeds = {s["threads"]: s["tg_tok_s_median"] for s in r["speed"]}
        rel = {t: base[t] / v for t, v in speeds.items()} if base else {}
        table.append({"format": r["name"], "file_bytes": r["file_bytes"], "tg_tok_s": speeds,
                      "tg_tok_s_samples": {s["threads"]: s["tg_tok_s_samples"] for s in r["speed"]},
                      "ms_per_token": {t: 1000 / v for t, v in speeds.items()},
                      "cost_vs_q4_0": rel, "cost_vs_q4_0_mean": statistics.fmean(rel.values()) if rel else None,
                      "in_decode_cost_table": DECODE_COST.get(r["name"])})
    log("\nformat   MB     " + "  ".join(f"tok/s -t {t}  x Q4_0" for t in args.threads) + "  mean x Q4_0  table")
    for row in table:
        log(f"{row['format']:7} {row['file_bytes'] / 1e6:6.0f}  "
            + "  ".join(f"{row['tg_tok_s'][t]:10.1f}  {row['cost_vs_q4_0'].get(t, float('nan')):6.3f}" for t in args.threads)
            + f"  {row['cost_vs_q4_0_mean'] or float('nan'):11.3f}  {row['in_decode_cost_table']}")
    cpu = cpu_info()
    result = {"schema_version": 1, "cpu": cpu, "build": build, "layers": args.layers, "threads": args.threads,
              "rounds": args.rounds, "repetitions": args.repetitions, "n_gen": args.n_gen, "formats": table,
              "note": "cost = Q4_0's median tok/s / this format's at the same thread count: time per weight relative to "
                      "Q4_0 (every file holds the same weights; the fixed per-token work pulls ratios towards 1); "
                      "in_decode_cost_table: ewq.backends.llamacpp.DECODE_COST when this ran, to compare"}
    path = write_json_atomic(out / "decode_cost.json", result)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
