"""Stage 2: one streaming pass over the checkpoint: per-block entropy and the weights' fingerprint.

Reads one tensor at a time through safetensors.safe_open (two at once, one per core: the heavy work
in bincount/exp/hashing releases the GIL), never builds the model. The fingerprint hashes every
tensor's bytes, name, dtype and shape (xxh3-128 per tensor, sha256 over the list), so it changes
when any weight changes, not only when the model id does.
"""

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xxhash
from safetensors import safe_open
from tqdm import tqdm

from .checkpoint import Checkpoint
from .common import EWQError, write_json_atomic
from .entropy import ENTROPY_FUNCTIONS, HIST_BINS, block_entropy
from .probes import cache_dir

WORKERS = 2


@dataclass
class Analysis:
    fingerprint: str
    block_entropies: list  # one float per block, by index, of the primary entropy kind
    by_kind: dict          # entropy kind -> block entropies (the primary and any `also` kinds)
    seconds: float
    matrix_entropies: dict = None  # tensor name -> {entropy kind: entropy} for every block matrix
    from_cache: bool = False       # served from the analysis cache (no weight read)


def _read(t, rows: int | None = None):
    """Tensor `t` from its file (only its first `rows` rows when given), or one line saying the file is damaged."""
    try:
        with safe_open(str(t.file), framework="pt") as f:
            return f.get_tensor(t.name) if rows is None else f.get_slice(t.name)[:rows]
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt data
        raise EWQError(f"cannot read tensor {t.name} from {t.file}: {e}; the file is corrupt or truncated") from None


def tensor_digest(t, tensor: torch.Tensor) -> str:
    raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    return f"{t.name}|{t.dtype}|{list(t.shape)}|{xxhash.xxh3_128_hexdigest(raw)}"


def combine_digests(digests) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:32]


# ---- the analysis cache: re-planning or benchmarking the same files reads no weight again ----

def stat_key(ckpt: Checkpoint) -> str:
    """Identifies the checkpoint's files as they are now: path, size and modification time of each. Any rewrite
    of a file changes its mtime (and usually its size), so a changed weight is always analysed again."""
    parts = []
    for f in sorted({t.file for t in ckpt.tensors}):
        st = f.stat()
        parts.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _cache_path(ckpt: Checkpoint):

    return cache_dir() / "analysis" / f"analysis_{stat_key(ckpt)}.json"


# What the cached numbers depend on beside the files: the definitions of the entropies (the histogram's bins) and
# of the fingerprint. Recorded with them; an entry without it was made with these (the only ones there have been).
DEFINITIONS = {"histogram_bins": HIST_BINS, "fingerprint": "xxh3-128 per tensor, sha256[:32] over the sorted list"}


def _from_cache(ckpt: Checkpoint, kinds) -> dict | None:
    try:
        cached = json.loads(_cache_path(ckpt).read_text())
        if cached.get("definitions", DEFINITIONS) == DEFINITIONS and all(k in cached["by_kind"] for k in kinds):
            return cached
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _to_cache(ckpt: Checkpoint, analysis: Analysis) -> None:
    try:
        path = _cache_path(ckpt)
        old = _from_cache(ckpt, ()) or {"by_kind": {}, "matrix_entropies": {}}
        matrix = old["matrix_entropies"]
        for name, h in (analysis.matrix_entropies or {}).items():
            matrix.setdefault(name, {}).update(h)
        write_json_atomic(path, {"definitions": DEFINITIONS, "fingerprint": analysis.fingerprint,
                                 "by_kind": {**old["by_kind"], **analysis.by_kind},
                                 "matrix_entropies": matrix, "seconds": analysis.seconds})
    except OSError:
        pass  # a cache we cannot write only costs time


def analyze(ckpt: Checkpoint, entropy: str = "histogram", progress: bool = True, fingerprint_only: bool = False,
            also=()) -> Analysis:
    """Fingerprint plus the block entropies of `entropy` (and of the kinds in `also`), in one pass; served from
    the analysis cache when the checkpoint's files are unchanged since they were last analysed."""
    kinds = [] if fingerprint_only else list(dict.fromkeys((entropy,) + tuple(also)))
    unknown = [k for k in kinds if k not in ENTROPY_FUNCTIONS]
    if unknown:
        raise EWQError(f"unknown entropy kind '{unknown[0]}'; choose one of {', '.join(ENTROPY_FUNCTIONS)}")
    cached = _from_cache(ckpt, kinds)
    if cached is not None:
        by_kind = {k: cached["by_kind"][k] for k in kinds}
        return Analysis(cached["fingerprint"], by_kind.get(entropy, []), by_kind, 0.0, cached["matrix_entropies"],
                        from_cache=True)
    analysis = _analyze(ckpt, entropy, progress, fingerprint_only, kinds)
    _to_cache(ckpt, analysis)
    return analysis


def _analyze(ckpt: Checkpoint, entropy: str, progress: bool, fingerprint_only: bool, kinds) -> Analysis:
    matrices = {t.name for b in ckpt.blocks for t in b.matrices}
    start = time.perf_counter()

    def work(t):
        tensor = _read(t)
        h = {k: ENTROPY_FUNCTIONS[k](tensor) for k in kinds} if t.name in matrices else {}
        return t, tensor_digest(t, tensor), h

    # Read file by file, in header order, so the page cache and disk see sequential reads.
    order = sorted(ckpt.tensors, key=lambda t: (str(t.file), t.name))
    total = sum(t.numel for t in order)
    digests, entropies = [], {}
    with ThreadPoolExecutor(WORKERS) as pool, tqdm(total=total, unit="param", unit_scale=True,
                                                   desc="fingerprint" if fingerprint_only else f"{entropy} entropy",
                                                   disable=not progress, leave=False) as bar:
        for t, digest, h in pool.map(work, order):
            digests.append(digest)
            entropies[t.name] = h
            bar.update(t.numel)
    by_kind = {k: [block_entropy([entropies[t.name][k] for t in b.matrices], [t.numel for t in b.matrices])
                   for b in ckpt.blocks] for k in kinds}
    return Analysis(combine_digests(digests), by_kind.get(entropy, []), by_kind, time.perf_counter() - start,
                    {name: h for name, h in entropies.items() if h})


def fingerprint_in_memory(ckpt: Checkpoint, tensors: dict) -> str:
    """The same fingerprint as `fingerprint`, from tensors already in memory (no second read of the files)."""
    return combine_digests(tensor_digest(t, tensors[t.name]) for t in ckpt.tensors)


def fingerprint(ckpt: Checkpoint, progress: bool = True) -> str:
    return analyze(ckpt, progress=progress, fingerprint_only=True).fingerprint


# A checkpoint converted from a GGUF file with a float minimum per 32 weights (Q4_1: the embedded SmolLM2's) has every
# block weight on its 32-block's 16-level grid (minimum + step x q, step = (max - min) / 15). Formats of that family
# (Q4_1, Q5_1) re-find the grid and look near-lossless there, which says nothing of the method, so the llama.cpp
# sweep offers them only to checkpoints off such a grid (ewq.planning).
GRID_BLOCK = 32
GRID_SAMPLE_ROWS = 64
ON_GRID_STEPS = 0.05  # mean distance to the grid, in steps: ~0.002 on SmolLM2, ~0.25 for weights with no grid


def q4_1_steps(weight: torch.Tensor) -> tuple:
    """(the weights as 32-blocks along each row, [n, 32] float32; each block's minimum; its Q4_1 grid step)."""
    blocks = weight.float().reshape(-1, GRID_BLOCK)
    low, high = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    return blocks, low, ((high - low) / 15).clamp_min(1e-12)


def q4_1_grid_distance(weight: torch.Tensor) -> float:
    """Mean distance of a weight to the nearest point of its 32-block's Q4_1 grid, in grid steps (0: on the grid;
    about 0.25 for weights with no grid). `weight`'s last dimension is whole 32-blocks."""
    blocks, low, step = q4_1_steps(weight)
    position = (blocks - low) / step
    return float((position - position.round()).abs().mean())


def on_q4_1_grid(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's block weights sit on a Q4_1 grid (it went through GGUF Q4_1): the mean grid distance
    of the first GRID_SAMPLE_ROWS rows of every matrix of the first block whose rows are whole 32-blocks (a few
    hundred KB read) is below ON_GRID_STEPS."""
    distances = []
    for t in ckpt.blocks[0].matrices if ckpt.blocks else ():
        if len(t.shape) == 2 and t.shape[-1] % GRID_BLOCK == 0:
            distances.append(q4_1_grid_distance(_read(t, GRID_SAMPLE_ROWS)))
    return bool(distances) and sum(distances) / len(distances) < ON_GRID_STEPS
