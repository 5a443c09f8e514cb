"""Measured sensitivity: the damage each block (or each matrix) does when it alone is quantized.

For every item (a block, or one matrix of a block) and for 8-bit and 4-bit separately: quantize that
item only (everything else raw), measure the mean KL(original || variant) on calibration windows,
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

from .apply import block_list, load_model, matrix_shape, quantizable_layers, quantize_layer
from .backends import QuantSettings, get_backend
from .common import EWQError, write_json_atomic
from .quality import compute_reference, evaluate, load_corpus, make_windows

CALIB_TOKENS = 512
RANDOM_PLANS = 3


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


def sweep(model, blocks, reference: dict, settings: QuantSettings, dtype, device: str, progress: bool = True,
          items=None, done=None, save=None) -> list:
    """[{"8-bit": kl, "4-bit": kl}] per item (default: every block); the model is restored afterwards.
    `done` holds rows measured earlier (resumed); `save(rows)` is called after every item."""
    if items is None:
        items = [{"block": i, "matrix": None} for i in range(len(blocks))]
    precisions = [p for p in ("8-bit", "4-bit") if p in get_backend(settings.backend).PRECISIONS]
    rows = list(done or [])
    for item in tqdm(items[len(rows):], desc="sensitivity", initial=len(rows), total=len(items),
                     disable=not progress, leave=False):
        row = {}
        for precision in precisions:
            with quantized(blocks, [(item, precision)], settings, dtype, device):
                row[precision] = evaluate(model, reference, device, progress=False)["kl_mean"]
        rows.append(row)
        if save:
            save(rows)
    return rows


def calibration_key(fingerprint: str, corpus, windows: torch.Tensor, settings: QuantSettings, dtype, device: str,
                    granularity: str = "block") -> dict:
    return {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256,
            "windows": int(windows.shape[0]), "window": int(windows.shape[1]), "position": "end of corpus",
            "dtype": str(dtype).replace("torch.", ""), "device_type": device.split(":")[0],
            "granularity": granularity, **settings.key()}


class Calibration:
    """The float model, its calibration windows and reference, loaded once for a sweep or plan checks."""

    def __init__(self, source, ckpt, fingerprint, calib_tokens, calib_text, window, settings, granularity, device):
        from .source import load_tokenizer

        # fp32 on the CPU: the ranking needs accuracy, and fp32 prefill is several times faster there than bf16.
        # torchao's CUDA int4 runs in bf16 only.
        self.dtype = torch.float32 if device == "cpu" else (
            torch.bfloat16 if settings.backend == "torchao" else torch.float16)
        self.device, self.settings, self.ckpt = device, settings, ckpt
        get_backend(settings.backend).check(settings, self.dtype, device)
        self.source = source
        corpus = load_corpus(calib_text)
        self.windows = make_windows(load_tokenizer(source.path), corpus, calib_tokens, window,
                                    from_end=True)
        self.key = calibration_key(fingerprint, corpus, self.windows, settings, self.dtype, device, granularity)
        self.model = self.reference = None

    def load(self, progress: bool):
        if self.model is None:
            self.model = load_model(self.source.path, self.dtype)
            if self.device != "cpu":
                self.model.to(self.device)
            self.reference = compute_reference(self.model, self.windows, self.device, progress=progress)
            self.blocks = block_list(self.model, self.ckpt.block_prefix)
        return self


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
    calibration.load(progress)

    def save(rows):  # after every item: Ctrl-C loses at most the item in progress
        write_json_atomic(path, {"schema_version": 2, "calibration": key, "items": rows, "complete": len(rows) == len(items),
                                 "seconds": round(time.perf_counter() - start, 1)})

    rows = sweep(calibration.model, calibration.blocks, calibration.reference, calibration.settings,
                 calibration.dtype, calibration.device, progress=progress, items=items, done=done, save=save)
    return rows, key, False


def measure_plans(calibration: Calibration, items, plans, progress: bool = True) -> list:
    """Mean KL on the calibration windows of each whole plan (a precision per item)."""
    calibration.load(progress)
    out = []
    for precisions in tqdm(plans, desc="whole-plan checks", disable=not progress, leave=False):
        with quantized(calibration.blocks, list(zip(items, precisions)), calibration.settings, calibration.dtype,
                       calibration.device):
            out.append(evaluate(calibration.model, calibration.reference, calibration.device, progress=False)["kl_mean"])
    return out
