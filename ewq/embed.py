"""Stage 5 and 6 for encoders: sentence embeddings, their speed, and their fidelity to the original's.

An encoder's job is a sentence embedding: token vectors pooled the way the model was trained to pool
(sentence-transformers' `1_Pooling/config.json`: mean, CLS or max; mean when the checkpoint says
nothing), then L2-normalised when its `modules.json` lists a Normalize step.

Sentences are real prose: lee_background.cor (gensim) split at sentence ends. Evaluation sentences are
taken from the start of the corpus and calibration sentences (sensitivity) from its end, never shared.

Speed (`encoder_suite`): sentences/s at batch 1 and batch 32 on the same fixed sentences (each batch
padded to its longest sentence), latency median and p95 at batch 1, one warm-up pass, --repeats runs.
Fidelity (`fidelity`): against the original's embeddings of the evaluation sentences, computed once from
the float model and cached: mean and minimum cosine similarity, and top-10 nearest-neighbour agreement
(the share of each sentence's 10 nearest other sentences that stay among its 10 nearest): what a
retrieval service built on the embeddings would notice.

The runner (runner.py) calls this module for an encoder, through the same small interface as the decoder's
generate.py: add_arguments, check_arguments, quality_inputs, make_reference, measure, format_result.
"""

import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import quality
from .common import EWQError
from .probes import peak_memory_gb, reset_peak_memory, synchronize

KIND = "encoder"
EVAL_SENTENCES = 1024
CALIB_SENTENCES = 128
SPEED_SENTENCES = 128
BATCH_SIZES = (1, 32)
NEIGHBOURS = 10
POOLING_MODES = ("mean", "cls", "max")
# Sentence end: . ! ? (optionally closed by a quote or bracket), then space and an upper-case letter or a quote.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(A-Z0-9])")


@dataclass
class Pooling:
    mode: str = "mean"
    normalize: bool = False
    source: str = "default (no 1_Pooling/config.json)"


def read_pooling(path: Path) -> Pooling:
    """The model's own pooling, from its sentence-transformers files; mean (the common default) otherwise."""
    path = Path(path)
    config_file = path / "1_Pooling" / "config.json"
    normalize = False
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    if not config_file.is_file():
        return Pooling(normalize=normalize)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EWQError(f"{config_file} is not valid JSON ({e}); restore it from the base model") from None
    modes = [m for m in POOLING_MODES if config.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")]
    if len(modes) != 1:
        raise EWQError(f"{config_file} asks for pooling {modes or 'none'}; EWQ supports exactly one of "
                       f"{', '.join(POOLING_MODES)}")
    return Pooling(modes[0], normalize, str(config_file.relative_to(path)))


def max_length(config: dict, tokenizer, path: Path) -> int:
    """Tokens per sentence the model takes: sentence-transformers' max_seq_length, else the position table
    (RoBERTa-style models keep two positions for padding) and the tokenizer's own limit."""
    try:
        return int(json.loads((Path(path) / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    limit = config.get("max_position_embeddings", 512)
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2
    tok_limit = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_limit))


def split_sentences(text: str) -> list:
    out = []
    for line in text.splitlines():
        out += [s.strip() for s in _SENTENCE_END.split(line) if len(s.split()) >= 3]
    return out


def corpus_sentences(corpus, n: int, from_end: bool = False) -> list:
    """n sentences from the start of the corpus (evaluation) or from its end (calibration)."""
    if n < 1:
        raise EWQError(f"the number of sentences must be positive, got {n}")
    sentences = split_sentences(corpus.text)
    if len(sentences) < n:
        raise EWQError(f"corpus {corpus.name} holds {len(sentences)} sentences, {n} needed; give a longer text or "
                       f"ask for fewer sentences")
    return sentences[-n:] if from_end else sentences[:n]


def sentences_digest(sentences) -> str:
    """Identifies the exact sentences (not just their count) in cache keys: a change in splitting is a new key."""
    import hashlib

    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]


def check_sentences(sentences) -> list:
    """What a caller (the server) hands in: a non-empty list of strings."""
    if not isinstance(sentences, list) or not sentences:
        raise EWQError("give a non-empty list of sentences")
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise EWQError(f"sentence {bad[0]} is not a string")
    return sentences


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    hidden = hidden.float()
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(out, dim=-1) if pooling.normalize else out


@dataclass
class Embedder:
    """How one model turns sentences into embeddings: its tokenizer, its pooling and its token limit.
    Built once (`Embedder.of`) by whoever embeds: the benchmark, the sensitivity sweep, the service."""
    tokenizer: object
    pooling: Pooling
    max_length: int

    @classmethod
    def of(cls, path: Path, config: dict, tokenizer) -> "Embedder":
        return cls(tokenizer, read_pooling(path), max_length(config, tokenizer, path))

    def truncated(self, sentences) -> list:
        """Indices of the sentences longer than max_length tokens (embedded from their first max_length tokens)."""
        full = self.tokenizer(sentences, add_special_tokens=True, truncation=False)["input_ids"]
        return [i for i, ids in enumerate(full) if len(ids) > self.max_length]

    def tokenize(self, sentences) -> dict:
        """The model's inputs for one batch, in the given order, padded to its longest sentence (as served)."""
        return dict(self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def batch(self, model, sentences, device: str = "cpu") -> torch.Tensor:
        """One padded batch, in the given order."""
        batch = {k: v.to(device) for k, v in self.tokenize(sentences).items()}
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        return pool(hidden, batch["attention_mask"], self.pooling).cpu()

    def length_batches(self, sentences, batch_size: int = 32) -> list:
        """[indices of the sentences in one batch]: batches in length order (little padding), as `embed` runs them."""
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

    def embed(self, model, sentences, device: str = "cpu", batch_size: int = 32, progress: bool = False,
              desc: str = "embedding") -> torch.Tensor:
        """[n, dim] float32 embeddings. Sentences are batched in length order (little padding), returned in order."""
        out = [None] * len(sentences)
        for idx in tqdm(self.length_batches(sentences, batch_size), desc=desc, disable=not progress, leave=False):
            for i, e in zip(idx, self.batch(model, [sentences[i] for i in idx], device)):
                out[i] = e
        return torch.stack(out)


# ---- fidelity ----

def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each sentence's k nearest other sentences by cosine."""
    e = torch.nn.functional.normalize(e.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=-1).indices


def fidelity(reference: torch.Tensor, variant: torch.Tensor, k: int = NEIGHBOURS) -> dict:
    cos = cosine(reference, variant)
    k = min(k, reference.shape[0] - 1)
    agree = None
    if k >= 1:
        ref_nn, var_nn = neighbours(reference, k), neighbours(variant, k)
        hits = (ref_nn.unsqueeze(-1) == var_nn.unsqueeze(-2)).any(-1).sum().item()
        agree = hits / (k * reference.shape[0])
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "cosine_loss_mean": (1 - cos).mean().item(), f"top{NEIGHBOURS}_agreement": agree,
            "neighbours_k": k, "sentences": int(reference.shape[0])}


# ---- speed ----

def encoder_suite(model, embedder: Embedder, sentences, repeats: int, device: str = "cpu", batch_sizes=BATCH_SIZES,
                  progress: bool = True) -> dict:
    """Sentences/s per batch size on the same sentences, and batch-1 latency. Batches keep the sentences' order
    (fixed, not sorted by length: what a service sees) and pad to their longest sentence."""
    for bs in batch_sizes:  # warm-up: one untimed pass at each batch size (kernels are picked per input shape)
        for i in range(0, len(sentences), bs):
            embedder.batch(model, sentences[i:i + bs], device)
    reset_peak_memory(device)
    out, latencies = {}, []
    steps = [(bs, r) for bs in batch_sizes for r in range(repeats)]
    throughput = {bs: [] for bs in batch_sizes}
    for bs, _ in tqdm(steps, desc="encoder benchmark", disable=not progress, leave=False):
        start = time.perf_counter()
        for i in range(0, len(sentences), bs):
            t0 = time.perf_counter()
            embedder.batch(model, sentences[i:i + bs], device)
            synchronize(device)
            if bs == 1:
                latencies.append(time.perf_counter() - t0)
        throughput[bs].append(len(sentences) / (time.perf_counter() - start))
    for bs in batch_sizes:
        out[f"batch_{bs}"] = {"sentences_per_s": statistics.median(throughput[bs]),
                              "sentences_per_s_min": min(throughput[bs]), "sentences_per_s_max": max(throughput[bs])}
    if latencies:
        ordered = sorted(latencies)
        out["latency_batch_1_s_median"] = statistics.median(ordered)
        out["latency_batch_1_s_p95"] = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    out["peak_memory_gb"] = peak_memory_gb(device)
    return out


def format_result(result: dict) -> str:
    e, m, q = result["encoder"], result["memory"], result.get("quality")
    lines = [f"{'batch':>5} {'sentences/s':>12} {'min':>8} {'max':>8}"]
    for bs in BATCH_SIZES:
        b = e[f"batch_{bs}"]
        lines.append(f"{bs:>5} {b['sentences_per_s']:>12.1f} {b['sentences_per_s_min']:>8.1f} {b['sentences_per_s_max']:>8.1f}")
    lines.append(f"{result['variant']}: {e['batch_32']['sentences_per_s']:.1f} sentences/s at batch 32, "
                 f"{e['batch_1']['sentences_per_s']:.1f} at batch 1 (latency median {1000 * e['latency_batch_1_s_median']:.1f} ms, "
                 f"p95 {1000 * e['latency_batch_1_s_p95']:.1f} ms), weights {m['weight_gb']:.3f} GB, peak "
                 f"{m['peak_allocated_gb']:.3f} GB on {result['environment']['device_name']}, "
                 f"{result['environment']['dtype']}, {e['pooling']} pooling")
    if q:
        lines.append(f"fidelity: cosine mean {q['cosine_mean']:.4f} (min {q['cosine_min']:.4f}), top-{NEIGHBOURS} "
                     f"neighbour agreement {q[f'top{NEIGHBOURS}_agreement']:.3f} over {q['sentences']} sentences of "
                     f"{q['corpus']}{' (reference from cache)' if q['reference_cached'] else ''}")
    return "\n".join(lines)


# ---- the encoder's part of a benchmark run (runner.py calls these) ----

MISSING_REFERENCE = "no cached reference of the base model for these sentences; run `python benchmark_original.py " \
                    "--model {base}` with the same --eval-* settings first"


def add_arguments(p) -> None:
    """The flags only encoders take; a decoder refuses them (runner.check_kind_flags)."""
    p.add_argument("--eval-sentences", type=int, default=None,
                   help=f"corpus sentences whose embeddings are compared with the original's (cosine, "
                        f"top-10 neighbours; default {EVAL_SENTENCES}). Encoders always measure this fidelity")
    p.add_argument("--speed-sentences", type=int, default=None,
                   help=f"sentences embedded at batch 1 and at batch 32 for sentences/s and latency "
                        f"(default {SPEED_SENTENCES})")


def check_arguments(args) -> None:
    for flag, value in (("--eval-sentences", args.eval_sentences), ("--speed-sentences", args.speed_sentences)):
        if value is not None and value < 2:
            raise EWQError(f"{flag} must be at least 2, got {value}")


def quality_inputs(args, path: Path, config: dict, tokenizer, fingerprint: str, dtype, device: str) -> dict:
    """Evaluation sentences, the model's pooling and (if cached) the original's embeddings of them. Encoders
    always measure this fidelity."""
    corpus = quality.load_corpus(args.eval_text)
    sentences = corpus_sentences(corpus, args.eval_sentences or EVAL_SENTENCES)
    embedder = Embedder.of(path, config, tokenizer)
    limit = embedder.max_length
    cut = embedder.truncated(sentences)
    if cut:
        print(f"note: {len(cut)} of {len(sentences)} sentences are longer than the model's {limit} tokens and are "
              f"embedded from their first {limit} tokens")
    key = reference_key(fingerprint, corpus, sentences, embedder, dtype, device)
    cache = quality.cache_path(Path(args.out_dir) / ".reference", key)
    reference = quality.load_reference(cache, key, names={"embeddings"})
    return {"corpus": corpus, "sentences": sentences, "embedder": embedder, "truncated": cut,
            "key": key, "path": cache, "reference": reference, "cached": reference is not None}


def reference_key(fingerprint: str, corpus, sentences, embedder, dtype, device: str) -> dict:
    """What the original's cached embeddings depend on: the weights, the exact sentences, how they are pooled and
    cut (pooling mode, normalisation, max length), the dtype and the device type."""
    return {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256,
            "sentences": len(sentences), "sentences_sha256": sentences_digest(sentences),
            "pooling": embedder.pooling.mode, "normalize": embedder.pooling.normalize, "max_length": embedder.max_length,
            "dtype": str(dtype).replace("torch.", ""), "device_type": device.split(":")[0], "kind": "embeddings"}


def make_reference(model, q: dict, device: str, progress: bool) -> dict:
    """The original's embeddings of the evaluation sentences, from the float model, saved to the reference cache."""
    if device != "cpu":
        model.to(device)
    reference = {"embeddings": q["embedder"].embed(model, q["sentences"], device, progress=progress,
                                                   desc="reference embeddings")}
    if device != "cpu":
        model.to("cpu")
    quality.save_reference(q["path"], q["key"], reference)
    return reference


def measure(args, ctx: dict, weight_bytes: int) -> dict:
    """Sentences/s at batch 1 and 32, batch-1 latency, and (for a quantized model) fidelity to the original's
    embeddings of the evaluation sentences."""
    q, device = ctx["quality"], ctx["device"]
    speed_sentences = q["sentences"][:args.speed_sentences or SPEED_SENTENCES]
    start = time.perf_counter()
    embedder = q["embedder"]
    encoder = encoder_suite(ctx["model"], embedder, speed_sentences, args.repeats, device,
                            progress=not args.no_progress)
    fidelity_of = None
    if ctx["path_taken"] != "original-checkpoint":
        t0 = time.perf_counter()
        variant = embedder.embed(ctx["model"], q["sentences"], device, progress=not args.no_progress, desc="fidelity")
        fidelity_of = {**fidelity(q["reference"]["embeddings"], variant), "corpus": q["corpus"].name,
                       "corpus_sha256": q["corpus"].sha256, "reference_cache": str(q["path"]),
                       "reference_cached": q["cached"], "eval_s": time.perf_counter() - t0}
    peak = encoder.pop("peak_memory_gb")
    encoder.update(pooling=embedder.pooling.mode, normalize=embedder.pooling.normalize,
                   pooling_source=embedder.pooling.source, max_length=embedder.max_length,
                   truncated_sentences=len(q["truncated"]),
                   bench_s=time.perf_counter() - start)
    settings = {"repeats": args.repeats, "speed_sentences": len(speed_sentences), "eval_sentences": len(q["sentences"]),
                "batch_sizes": list(BATCH_SIZES), "warmup": "one untimed pass at each batch size",
                "order": "corpus order, each batch padded to its longest sentence"}
    return {"tests": [], "warmup_s": None, "quality": fidelity_of, "settings": settings, "peak_gb": peak,
            "peak_during": "encoder benchmark", "speed": None, "encoder": encoder}
