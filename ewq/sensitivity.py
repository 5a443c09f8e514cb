"""Measured sensitivity: the damage each block (or each matrix) does when it alone is quantized.

For every item (a block, or one matrix of a block) and for 8-bit and 4-bit separately: quantize that
item only (everything else raw), measure the damage on calibration text (decoders: mean KL(original ||
variant) per token on windows; encoders: mean 1 - cosine of sentence embeddings on sentences),
restore the item's float layers. The model is loaded once; at any moment only one item exists twice.
Sensitivity is measured with the backend that will run the plan (bitsandbytes' LLM.int8 and nf4 are not
torchao's weight-only int8 and HQQ int4), so the cache key holds the backend and its formats.
Calibration windows come from the end of the corpus and the evaluation windows of `--quality` from its
start, so a plan is never graded on its own calibration text. Results are cached per (weights
fingerprint, corpus, calibration, backend settings, granularity) and written after every item, so an
interrupted sweep resumes where it stopped; re-planning with another size target costs nothing.

`measure_plans` grades whole plans on the same windows: the check that the summed single-item KLs
predict the KL of the plan, and random plans of the same size as the floor any method must beat.
"""

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from . import embed
from .apply import (
    block_list,
    load_model,
    matrix_shape,
    quantizable_layers,
    quantize_layer,
)
from .backends import QuantSettings, get_backend
from .common import EWQError, write_json_atomic
from .quality import compute_reference, evaluate, load_corpus, make_windows
from .source import load_tokenizer

CALIB_TOKENS = 512
CALIB_SENTENCES = 128
RANDOM_PLANS = 3
# what "damage" means, by model kind; plans name their sensitivity fields after it (kl_4bit, cosine_loss_4bit)
METRICS = {"decoder": "kl", "encoder": "cosine_loss"}


def item_layers(blocks, item) -> list:
    """(block module, name, float layer) of the layers an item covers."""
    block = blocks[item["block"]]
    layers = quantizable_layers(block)
    if item["matrix"] is not None:
        layers = [(n, m) for n, m in layers if n == item["matrix"]]
        if not layers:
            raise EWQError(f"block {item['block']} has no matrix '{item['matrix']}'")
    return [(block, n, m) for n, m in layers]


@contextmanager
def quantized(blocks, assignments, settings: QuantSettings, dtype, device: str):
    """Temporarily replace layers: assignments is [(item, precision)]; every float layer is restored after."""
    backend = get_backend(settings.backend)
    swapped = []
    try:
        for item, precision in assignments:
            if precision == "raw":
                continue
            for block, name, layer in item_layers(blocks, item):
                if backend.unsupported(matrix_shape(layer), precision, settings):
                    continue  # kept raw, as apply_plan does
                block.set_submodule(name, quantize_layer(layer, precision, settings, dtype, device))
                swapped.append((block, name, layer))
        yield
    finally:
        for block, name, layer in swapped:
            block.set_submodule(name, layer)


def sweep(calibration: "Calibration", items=None, done=None, save=None, progress: bool = True) -> list:
    """[{"8-bit": damage, "4-bit": damage}] per item (default: every block): calibration.score() with that item
    alone quantized; the model is restored afterwards. `done` holds rows measured earlier (resumed);
    `save(rows)` is called after every item."""
    c = calibration.load(progress)
    if items is None:
        items = [{"block": i, "matrix": None} for i in range(len(c.blocks))]
    precisions = [p for p in ("8-bit", "4-bit") if p in get_backend(c.settings.backend).PRECISIONS]
    rows = list(done or [])
    for item in tqdm(items[len(rows):], desc="sensitivity", initial=len(rows), total=len(items),
                     disable=not progress, leave=False):
        row = {}
        for precision in precisions:
            with quantized(c.blocks, [(item, precision)], c.settings, c.dtype, c.device):
                row[precision] = c.score()
        rows.append(row)
        if save:
            save(rows)
    return rows


def calibration_key(fingerprint: str, corpus, sample: dict, settings: QuantSettings, dtype, device: str,
                    granularity: str = "block") -> dict:
    """What the measured numbers depend on; `sample` says which text: {"windows", "window"} or {"sentences"}."""
    return {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256, **sample,
            "position": "end of corpus", "dtype": str(dtype).replace("torch.", ""), "device_type": device.split(":")[0],
            "granularity": granularity, **settings.key()}


class Calibration:
    """The float model, its calibration text and reference, loaded once for a sweep or plan checks.

    Decoders: token windows, damage = mean KL(original || variant) per token.
    Encoders: sentences, damage = mean (1 - cosine) between the original's and the variant's sentence embeddings."""

    def __init__(self, source, ckpt, fingerprint, calib_tokens, calib_text, window, settings, granularity, device,
                 calib_sentences: int = CALIB_SENTENCES):
        # fp32 on the CPU: the ranking needs accuracy, and fp32 prefill is several times faster there than bf16.
        # torchao's CUDA int4 runs in bf16 only.
        self.dtype = torch.float32 if device == "cpu" else (
            torch.bfloat16 if settings.backend == "torchao" else torch.float16)
        self.device, self.settings, self.ckpt, self.kind = device, settings, ckpt, ckpt.kind
        get_backend(settings.backend).check(settings, self.dtype, device)
        self.source = source
        corpus = load_corpus(calib_text)
        self.tokenizer = load_tokenizer(source.path)
        if self.kind == "encoder":
            self.sentences = embed.corpus_sentences(corpus, calib_sentences, from_end=True)
            self.embedder = embed.Embedder.of(source.path, ckpt.config, self.tokenizer)
            sample = {"sentences": len(self.sentences), "sentences_sha256": embed.sentences_digest(self.sentences),
                      "pooling": self.embedder.pooling.mode}
        else:
            self.windows = make_windows(self.tokenizer, corpus, calib_tokens, window, from_end=True)
            sample = {"windows": int(self.windows.shape[0]), "window": int(self.windows.shape[1])}
        self.metric = METRICS[self.kind]
        self.key = calibration_key(fingerprint, corpus, sample, settings, self.dtype, device, granularity)
        self.model = self.reference = None

    def _embed(self):
        return self.embedder.embed(self.model, self.sentences, self.device)

    def load(self, progress: bool):
        if self.model is None:
            self.model = load_model(self.source.path, self.dtype, self.kind)
            if self.device != "cpu":
                self.model.to(self.device)
            if self.kind == "encoder":
                self.reference = self._embed()
            else:
                self.reference = compute_reference(self.model, self.windows, self.device, progress=progress)
            self.blocks = block_list(self.model, self.ckpt.block_prefix)
        return self

    def score(self) -> float:
        """The damage the model's current state does (0 for the original)."""
        if self.kind == "encoder":
            return (1 - embed.cosine(self.reference, self._embed())).mean().item()
        return evaluate(self.model, self.reference, self.device, progress=False)["kl_mean"]


def measure(calibration: Calibration, items, cache_dir, progress: bool = True):
    """(per-item sensitivities, calibration key, cached?)."""
    key = calibration.key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / ".sensitivity" / f"sensitivity_{key['fingerprint'][:12]}_{digest}.json"
    done = []
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached["calibration"] == key:
                done = cached["items"] if "items" in cached else cached["blocks"]
                if len(done) == len(items):
                    return done, key, True
        except (ValueError, KeyError, TypeError):
            done = []  # a damaged cache entry is measured again and replaced
    start = time.perf_counter()

    def save(rows):  # after every item: Ctrl-C loses at most the item in progress
        write_json_atomic(path, {"schema_version": 2, "calibration": key, "items": rows, "complete": len(rows) == len(items),
                                 "seconds": round(time.perf_counter() - start, 1)})

    rows = sweep(calibration, items, done=done, save=save, progress=progress)
    return rows, key, False


def measure_plans(calibration: Calibration, items, plans, progress: bool = True) -> list:
    """The damage (calibration.metric) of each whole plan (a precision per item) on the calibration text."""
    calibration.load(progress)
    out = []
    for precisions in tqdm(plans, desc="whole-plan checks", disable=not progress, leave=False):
        with quantized(calibration.blocks, list(zip(items, precisions)), calibration.settings, calibration.dtype,
                       calibration.device):
            out.append(calibration.score())
    return out
