"""torch dynamic int8 on a sentence encoder (issue 21.4): speed and fidelity of the user's method, its options and
ONNX Runtime's dynamic int8, measured side by side. Not a test: a measurement to run on the machine that matters.

    .venv/bin/python bench/int8_encoder.py [--model models/minilm-l6] [--rounds 5] [--ort-python PY]

Every torch row is built the way benchmark.py builds it (apply.load_for_plan, the built-in uniform-8bit plan,
QuantSettings with the row's options) and timed in the same process, rows interleaved round by round, batches of 32
in corpus order padded to their longest, 1 thread (--threads); the figure is the median round, "x fp32" against the
fp32 row of the same run. Fidelity: cosine to the fp32 embeddings and top-10 neighbour agreement on the first 1024
corpus sentences (embed.fidelity, as benchmark.py scores encoders); outlier channels are chosen on the corpus's last
128 sentences, never evaluated on. ONNX Runtime rows (optional) run in another Python that has onnxruntime
(bench/int8_encoder_ort.py), timed against that process's own ORT fp32, scored against this process's fp32.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

DEFAULT_ORT_PYTHON = "/tmp/svc/ortvenv/bin/python"  # where this project's ONNX Runtime comparison venv was made
# (label, QuantSettings options, benchmark.py flags); the last is the recommended configuration
ROWS = (
    ("torch dynamic int8 (user's method)", {}, ""),
    ("per-channel weight scales", {"weight_scales": "channel"}, "--weight-scales channel"),
    ("per-channel + 8-bit activations", {"weight_scales": "channel", "act_bits": 8},
     "--weight-scales channel --act-bits 8"),
    ("per-channel + 8-bit act. + outlier channels (chosen)",
     {"weight_scales": "channel", "act_bits": 8, "outlier_channels": 8},
     "--weight-scales channel --act-bits 8 --outlier-channels 8"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "minilm-l6"), help="a local encoder checkpoint directory")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, every row once per round (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads (default 1)")
    p.add_argument("--speed-sentences", type=int, default=256)
    p.add_argument("--eval-sentences", type=int, default=1024)
    p.add_argument("--ort-python", default=None,
                   help=f"a Python with onnxruntime, onnx, torch and transformers for the ONNX Runtime rows "
                        f"(default {DEFAULT_ORT_PYTHON} when it exists; none: rows left out)")
    p.add_argument("--no-ort", action="store_true", help="leave the ONNX Runtime rows out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.model)
    if not (path / "config.json").is_file():
        print(f"no encoder checkpoint at {path} (config.json missing); pass --model DIR", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(args.threads)
    from ewq import embed, probes, quality
    from ewq.analysis import fingerprint
    from ewq.apply import load_for_plan, load_model
    from ewq.backends import QuantSettings
    from ewq.checkpoint import open_checkpoint
    from ewq.common import EWQError
    from ewq.plan import builtin_plan
    from ewq.source import ModelSource, load_tokenizer

    ckpt = open_checkpoint(path)
    if ckpt.kind != "encoder":
        print(f"{path} is a {ckpt.kind}, not an encoder", file=sys.stderr)
        return 1
    tokenizer = load_tokenizer(path)
    embedder = embed.Embedder.of(path, ckpt.config, tokenizer)
    corpus = quality.load_corpus()
    evaluation = embed.corpus_sentences(corpus, args.eval_sentences)
    speed_sentences = evaluation[:args.speed_sentences]
    plan = builtin_plan("uniform-8bit", ModelSource(path.name, path), ckpt, fingerprint(ckpt, progress=False), 32)

    models, flags, notes = {"fp32": load_model(path, torch.float32, "encoder")}, {"fp32": ""}, []
    for label, options, row_flags in ROWS:
        settings = QuantSettings("torch-dynamic", **options)
        try:
            start = time.perf_counter()
            models[label] = load_for_plan(path, plan, settings, torch.float32, "encoder", progress=False)[0]
            flags[label] = row_flags
            if options.get("outlier_channels"):
                notes.append(f"{label}: built in {time.perf_counter() - start:.1f} s (calibration included)")
        except EWQError as e:  # --act-bits 8 on a CPU without VNNI: said, not hidden
            notes.append(f"{label}: not run here: {e}")

    def throughput(model):
        start = time.perf_counter()
        for i in range(0, len(speed_sentences), 32):
            embedder.batch(model, speed_sentences[i:i + 32])
        return len(speed_sentences) / (time.perf_counter() - start)

    for model in models.values():
        throughput(model)  # warm-up: kernels are picked per shape
    speeds = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, model in models.items():
            speeds[label].append(throughput(model))
    reference = embedder.embed(models["fp32"], evaluation)
    rows = []
    base = statistics.median(speeds["fp32"])
    for label, model in models.items():
        s = statistics.median(speeds[label])
        rows.append((label, s / base, s, embed.fidelity(reference, embedder.embed(model, evaluation)), flags[label]))

    ort_rows = run_ort(args, path, speed_sentences, evaluation, embedder.max_length, reference, notes)

    print(f"model {path}  batch 32, {len(speed_sentences)} sentences timed x {args.rounds} interleaved rounds "
          f"(median), {args.threads} thread(s); fidelity on {len(evaluation)} sentences vs fp32")
    print(f"CPU: {json.dumps(probes.instruction_set('cpu'))}  torch {torch.__version__}, "
          f"quantized engine {torch.backends.quantized.engine}")
    print(f"| {'variant':54} | x fp32 | sent/s | cos mean | cos min | top-10 |")
    print(f"|{'-' * 56}|-------:|-------:|---------:|--------:|-------:|")
    for label, ratio, sps, fid, _ in rows + ort_rows:
        print(f"| {label:54} | {ratio:5.2f}x | {sps:6.1f} | {fid['cosine_mean']:8.4f} | {fid['cosine_min']:7.4f} "
              f"| {fid['top10_agreement']:6.3f} |")
    for label, *_, row_flags in rows:
        if row_flags:
            print(f"  {label}: benchmark.py --backend torch-dynamic --plan uniform-8bit {row_flags}")
    for line in notes:
        print(f"note: {line}")
    return 0


def run_ort(args, path, speed_sentences, evaluation, max_length, reference, notes) -> list:
    """The ONNX Runtime rows from bench/int8_encoder_ort.py in another Python, or [] (said in a note)."""
    import torch

    from ewq import embed

    python = args.ort_python or (DEFAULT_ORT_PYTHON if os.path.exists(DEFAULT_ORT_PYTHON) else None)
    if args.no_ort or python is None:
        notes.append("ONNX Runtime rows left out (--ort-python PY to add them)")
        return []
    with tempfile.TemporaryDirectory(prefix="ewq-ort-") as tmp:
        sentences, out = Path(tmp) / "sentences.json", Path(tmp) / "out.json"
        sentences.write_text(json.dumps({"speed": speed_sentences, "eval": evaluation, "max_length": max_length}))
        work = Path(tempfile.gettempdir()) / f"ewq-ort-{path.name}"  # the exported ONNX files, reused between runs
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run([python, str(Path(__file__).with_name("int8_encoder_ort.py")), str(path), str(sentences),
                               str(work), str(out), str(args.rounds), str(args.threads)], capture_output=True, text=True,
                              env=env, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            notes.append(f"ONNX Runtime rows failed in {python}: {tail}")
            return []
        result = json.loads(out.read_text())
    version = result.pop("_versions")["onnxruntime"]
    base = statistics.median(result["ORT fp32"]["speeds"])
    rows = []
    for label, r in result.items():
        s = statistics.median(r["speeds"])
        vectors = torch.tensor(r["embeddings"])
        rows.append((f"{label} (x ORT fp32)", s / base, s, embed.fidelity(reference, vectors), ""))
    notes.append(f"ONNX Runtime {version}, {python}; its x is against its own fp32 run in that process")
    return rows


if __name__ == "__main__":
    sys.exit(main())
