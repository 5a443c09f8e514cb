"""EWQ's ONNX export against ONNX Runtime's own models (issue 27's goal): speed and fidelity, measured side by side.
Not a test: a measurement to run on the machine that matters.

    .venv/bin/python bench/onnx_encoder.py --plan PLAN [--model minilm-l6] [--rounds 5] [--threads 1,2]

Rows, all run by ONNX Runtime in this process (CPU provider, all graph optimizations, one inter-op thread):
  ORT fp32              the float encoder exported by ewq/onnx_export.py (a raw plan)
  ORT int8 per-channel  ONNX Runtime's own all-int8 model: quantize_dynamic(fp32, per_channel=True, QInt8) with its
                        defaults (every MatMul with a constant weight, and the embedding Gathers), what
                        sentence-transformers' export_dynamic_quantized_onnx_model and optimum make
  EWQ <plan hash>       python -m ewq.export onnx of each --plan (int8 where it says 8-bit, float32 where raw), and
                        with --outlier-channels K the same exported with --outlier-channels K
Speed: sentences/s on the first --speed-sentences corpus sentences in corpus order, batches of 1 and 32 padded to their
longest (as benchmark.py's encoder suite), for each thread count; every (threads, batch, row) once per round, rounds
interleaved, the median round reported. Fidelity: cosine to torch fp32's embeddings and top-10 neighbour agreement on
the first --eval-sentences corpus sentences, batched by length in 32s as benchmark.py scores encoders (embed.fidelity);
neither the sweep's calibration sentences (the corpus's end) nor anything else tuned on them.
"""

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, action="append",
                   help="an EWQ plan to export (raw and 8-bit; e.g. from main_cache_model.py --method sensitivity "
                        "--backend onnxruntime); repeat for more rows")
    p.add_argument("--model", default="minilm-l6", help="the encoder (default minilm-l6)")
    p.add_argument("--outlier-channels", type=int, default=0,
                   help="also a row per plan exported with python -m ewq.export onnx --outlier-channels K")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, every row once per round (default 5)")
    p.add_argument("--threads", default="1,2", help="ONNX Runtime intra-op thread counts, comma-separated (default 1,2)")
    p.add_argument("--batches", default="32,1", help="batch sizes, comma-separated (default 32,1)")
    p.add_argument("--speed-sentences", type=int, default=256, help="sentences per timed pass (default 256)")
    p.add_argument("--eval-sentences", type=int, default=1024, help="sentences scored for fidelity (default 1024)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ewq-onnx-bench"),
                   help="where the ONNX files are written (reused when present)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def make_files(args, source, ckpt, fp) -> dict:
    """{row label: ONNX file}: the float export, ONNX Runtime's own per-channel model of it, EWQ's plan export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ewq.onnx_export import export_onnx, onnx_file
    from ewq.plan import builtin_plan, load_plan, plan_hash

    work = Path(args.work)
    plans = [load_plan(p) for p in args.plan]
    ks = [0] + ([args.outlier_channels] if args.outlier_channels else [])
    dirs = {"fp32": (work / f"{source.path.name}-fp32", builtin_plan("raw", source, ckpt, fp, 32), 0),
            **{(i, k): (work / f"{source.path.name}-{plan_hash(p)}{f'-o{k}' if k else ''}", p, k)
               for i, p in enumerate(plans) for k in ks}}
    for directory, p, k in dirs.values():
        if not directory.is_dir():
            export_onnx(p, source, ckpt, directory, fp, k)
    fp32 = onnx_file(dirs["fp32"][0])
    ort_channel = work / f"{source.path.name}-ort-int8-per-channel.onnx"
    if not ort_channel.is_file():
        logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" note is for static quantization
        quantize_dynamic(fp32, ort_channel, per_channel=True, weight_type=QuantType.QInt8)
    files = {"ORT fp32": fp32, "ORT int8 per-channel (its own)": ort_channel}
    for i, p in enumerate(plans):
        counts = p["matrix_counts"]
        for k in ks:
            files[f"EWQ {plan_hash(p)} ({counts.get('8-bit', 0)} int8, {counts.get('raw', 0)} fp32)"
                  f"{f' +{k} outl.' if k else ''}"] = onnx_file(dirs[(i, k)][0])
    return files


def measure_speed(args, files, embedder, sentences) -> dict:
    """{(threads, batch, label): [sentences/s per round]}, rounds interleaved."""
    from ewq.backends.onnxruntime import OrtEncoder

    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    models = {(t, label): OrtEncoder(path, threads=t) for t in threads for label, path in files.items()}

    def throughput(model, batch):
        start = time.perf_counter()
        for i in range(0, len(sentences), batch):
            embedder.batch(model, sentences[i:i + batch])
        return len(sentences) / (time.perf_counter() - start)

    for (t, label), model in models.items():  # warm-up at every batch size (kernels are picked per shape)
        for b in batches:
            throughput(model, b)
    speeds = {(t, b, label): [] for t in threads for b in batches for label in files}
    for _ in range(args.rounds):
        for t in threads:
            for b in batches:
                for label in files:
                    speeds[(t, b, label)].append(throughput(models[(t, label)], b))
    return speeds


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import torch

    from ewq import embed, probes, quality
    from ewq.analysis import fingerprint
    from ewq.apply import load_model
    from ewq.backends.onnxruntime import OrtEncoder
    from ewq.checkpoint import open_checkpoint
    from ewq.source import load_tokenizer, resolve_model

    source = resolve_model(args.model, ROOT / "models")
    ckpt = open_checkpoint(source.path)
    fp = fingerprint(ckpt, progress=False)
    files = make_files(args, source, ckpt, fp)
    embedder = embed.Embedder.of(source.path, ckpt.config, load_tokenizer(source.path))
    corpus = quality.load_corpus()
    evaluation = embed.corpus_sentences(corpus, args.eval_sentences)
    torch.set_num_threads(2)
    reference = embedder.embed(load_model(source.path, torch.float32, "encoder"), evaluation)
    fidelity = {label: embed.fidelity(reference, embedder.embed(OrtEncoder(path, threads=2), evaluation))
                for label, path in files.items()}
    speeds = measure_speed(args, files, embedder, evaluation[:args.speed_sentences])
    rows = report(args, files, speeds, fidelity)
    print(f"model {source.path}, plan {args.plan}; {args.speed_sentences} sentences x {args.rounds} interleaved rounds "
          f"(median); fidelity on {len(evaluation)} sentences vs torch fp32")
    print(f"CPU: {json.dumps(probes.instruction_set('cpu'))}; onnxruntime {onnxruntime.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"schema_version": 1, "command": " ".join(sys.argv), "rows": rows,
                                               "onnxruntime": onnxruntime.__version__}, indent=2))
    return 0


def report(args, files, speeds, fidelity) -> list:
    labels = list(files)
    rows = []
    print(f"| threads | batch | {'variant':40} | sent/s | x ORT fp32 | x ORT per-channel | cos mean | cos min | top-10 |")
    print(f"|---:|---:|{'-' * 42}|---:|---:|---:|---:|---:|---:|")
    for (t, b, label), values in speeds.items():
        s = statistics.median(values)
        fp32, own = (statistics.median(speeds[(t, b, labels[i])]) for i in (0, 1))
        f = fidelity[label]
        rows.append({"threads": t, "batch": b, "variant": label, "sentences_per_s": s, "sentences_per_s_rounds": values,
                     "x_ort_fp32": s / fp32, "x_ort_int8_per_channel": s / own, **f})
        print(f"| {t} | {b} | {label:40} | {s:6.1f} | {s / fp32:5.2f} | {s / own:5.2f} | {f['cosine_mean']:.4f} | "
              f"{f['cosine_min']:.4f} | {f['top10_agreement']:.3f} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
