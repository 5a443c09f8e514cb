"""Measured block sensitivity: the damage each block does when it alone is quantized.

For every block and for 8-bit and 4-bit separately: quantize that block only (all others raw),
measure the mean KL(original || variant) on calibration windows, restore the block's float layers.
The model is loaded once; at any moment only one block exists twice (its float layers are kept aside
while the quantized copy is measured). Calibration windows come from the end of the corpus and the
evaluation windows of `--quality` from its start, so a plan is never graded on its own calibration text.
Results are cached per (weights fingerprint, corpus, calibration and quantization settings), so
re-planning with another size target costs nothing.
"""

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .apply import QuantSettings, block_list, load_model, quantizable_layers, quantize_layer, quiet_bitsandbytes
from .common import EWQError, write_json_atomic
from .quality import compute_reference, evaluate, load_corpus, make_windows

CALIB_TOKENS = 512


def sweep(model, blocks, reference: dict, settings: QuantSettings, dtype, device: str, progress: bool = True) -> list:
    """[{"8-bit": kl, "4-bit": kl}] per block; every block is restored to its float layers afterwards."""
    quiet_bitsandbytes()
    rows = []
    for block in tqdm(blocks, desc="block sensitivity", disable=not progress, leave=False):
        originals = quantizable_layers(block)
        row = {}
        for precision in ("8-bit", "4-bit"):
            try:
                for name, layer in originals:
                    block.set_submodule(name, quantize_layer(layer, precision, settings, dtype, device))
                row[precision] = evaluate(model, reference, device, progress=False)["kl_mean"]
            finally:
                for name, layer in originals:
                    block.set_submodule(name, layer)
        rows.append(row)
    return rows


def calibration_key(fingerprint: str, corpus, windows: torch.Tensor, settings: QuantSettings, dtype, device: str) -> dict:
    return {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256,
            "windows": int(windows.shape[0]), "window": int(windows.shape[1]), "position": "end of corpus",
            "dtype": str(dtype).replace("torch.", ""), "device_type": device.split(":")[0],
            "quant_type": settings.quant_type, "double_quant": settings.double_quant, "int8_threshold": settings.threshold}


def measure(source, ckpt, fingerprint: str, cache_dir, calib_tokens: int = CALIB_TOKENS, calib_text=None,
            window: int = 256, settings: QuantSettings = QuantSettings(), device: str = "cpu", progress: bool = True):
    """(per-block sensitivities, calibration settings, cached?) for one checkpoint."""
    from transformers import AutoTokenizer

    # fp32 on the CPU: the ranking needs accuracy, and fp32 prefill is several times faster there than bf16.
    dtype = torch.float32 if device == "cpu" else torch.float16
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    corpus = load_corpus(calib_text)
    windows = make_windows(tokenizer, corpus, calib_tokens, window, from_end=True)
    key = calibration_key(fingerprint, corpus, windows, settings, dtype, device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / ".sensitivity" / f"sensitivity_{fingerprint[:12]}_{digest}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached["calibration"] == key and len(cached["blocks"]) == len(ckpt.blocks):
                return cached["blocks"], key, True
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again and replaced
    start = time.perf_counter()
    model = load_model(source.path, dtype)
    if device != "cpu":
        model.to(device)
    reference = compute_reference(model, windows, device, progress=progress)
    blocks = block_list(model, ckpt.block_prefix)
    rows = sweep(model, blocks, reference, settings, dtype, device, progress)
    key_out = {**key, "tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(path, {"schema_version": 1, "calibration": key, "blocks": rows, "measured": key_out})
    return rows, key, False

