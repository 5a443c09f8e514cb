"""Rounding with error feedback (GPTQ: Frantar et al., 2022) onto llama.cpp's formats: `export gguf --rounding gptq`.

llama-quantize rounds every weight to the nearest value its block's scales allow (with an importance matrix, the
scales are chosen for the columns that matter). GPTQ keeps ggml's scales and ggml's bytes, and changes only which
level each weight takes: column by column along a row, each weight's rounding error is pushed onto the columns not
yet rounded, in the proportions that cancel it best on the calibration inputs X (H = X^T X / tokens, per matrix).
The file is an ordinary GGUF of the same types and size; llama.cpp reads it as any other.

    H     every block matrix's input, collected on `tokens` calibration tokens (the end of the calibration text, as
          the sweep's), one block at a time (ewq.stream: a block's float weights in memory at a time)
    U     the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (GPTQ's dampening: columns the text never
          uses get no feedback)
    scales  of each block (of 32 or 256 columns), from the weights as they are when GPTQ reaches its first column,
          chosen by ggml's own search (ewq.ggml_quants.block_grid: with the importance, as llama-quantize --imatrix)

Measured on SmolLM2-135M moved off its Q4_1 grid (docs/RESULTS.md, round 14): with 12288 calibration tokens, each
matrix's output error on unseen text is 0.3-0.9x llama-quantize --imatrix's at the same format (median ~0.5 for
Q4_0/IQ4_NL, ~0.65 for the k-quants); with 768 tokens GPTQ overfits (down_proj's 1536 inputs, up to 2x worse on
unseen text): it needs many more tokens than the sweep. IQ3_XXS / IQ3_S / IQ2_XS (lattice codebooks) and the float
types are written as llama-quantize writes them. Cost: the calibration pass, plus, per matrix, one pass over its
columns (O(rows x cols^2)): 126-139 s for SmolLM2-135M's 210 matrices on 2 cores shared with another job
(bench/llamacpp.py --ewq-gptq, round 14), the plan reused.
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .apply import quantizable_layers
from .common import EWQError
from .ggml_quants import (AFFINE_GRID, GRID_LEVELS, TYPES, _canonical, block_grid, level_values, pack_levels, row_sigma2,
                          torch_threads)
from .quality import BATCH, load_corpus, make_windows

GPTQ_TOKENS = 12288  # 48 windows of 256: below a few thousand, H of a 1536-input matrix is rank-poor and GPTQ overfits
DAMP = 0.01
LAZY_COLUMNS = 256  # columns updated together before the rest of the row (a multiple of every block: 32 and 256)


def can_round(type_name: str) -> bool:
    return _canonical(type_name) in GRID_LEVELS


def inverse_factor(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1, float32 (GPTQ's Cholesky form)."""
    h = hessian.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a column no token uses: its weight is rounded to nearest, no feedback from it
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)


def gptq_round(weight: torch.Tensor, type_name: str, factor: torch.Tensor, importance=None) -> tuple:
    """The weight [rows, cols] rounded to the ggml type with error feedback: (ggml's bytes, uint8 [rows, row bytes];
    the values they hold, float32 [rows, cols]). Rows are independent (a row's errors move along its own columns).
    On one torch thread: thousands of small column operations, each 10-50x slower when it waits for a second core
    (measured on the 2-core box: a 576 x 1536 matrix 17-20 s on 2 threads beside another job, 0.4 s on 1)."""
    with torch.no_grad(), torch_threads(1):
        return _gptq_round(weight, type_name, factor, importance)


def _gptq_round(weight, type_name, factor, importance):
    name = _canonical(type_name)
    w = weight.detach().to(torch.float32).clone()
    rows, cols = w.shape
    block = TYPES[name].block_size
    imp = None if importance is None else torch.as_tensor(importance, dtype=torch.float32).reshape(-1)
    sigma2 = row_sigma2(w) if imp is not None and block == 32 else None
    levels = torch.empty(rows, cols, dtype=torch.long)
    values = torch.empty(rows, cols)
    fields = []
    top = GRID_LEVELS[name][2] - GRID_LEVELS[name][1]
    for a in range(0, cols, LAZY_COLUMNS):
        b = min(a + LAZY_COLUMNS, cols)
        part, u = w[:, a:b].clone(), factor[a:b, a:b]
        err = torch.empty_like(part)
        for j in range(b - a):
            if j % block == 0:
                qw = None if imp is None else imp[a + j:a + j + block].expand(rows, block).contiguous()
                f, grid = block_grid(part[:, j:j + block].contiguous(), name, qw, sigma2)
                fields.append(f)
                if name in AFFINE_GRID:
                    base, step = grid[0], grid[1] - grid[0]
            x = part[:, j]
            if name in AFFINE_GRID:  # the nearest level of scale x level + offset; a zero scale: level 0
                s = step[:, j % block]
                pick = torch.where(s != 0, (x - base[:, j % block]) / torch.where(s != 0, s, 1.0), 0.0)
                pick = pick.round().clamp(0, top).long()
                q = base[:, j % block] + pick * s
            else:
                g = grid[:, :, j % block]
                pick = (g - x[None]).abs().argmin(0)
                q = g.gather(0, pick[None])[0]
            levels[:, a + j] = pick
            err[:, j] = (x - q) / u[j, j]
            part[:, j:] -= err[:, j:j + 1] * u[j, j:][None]
        w[:, b:] -= err @ factor[a:b, b:]
    for k, f in enumerate(fields):  # exactly what ggml reads back (the feedback above may differ in the last bit)
        values[:, k * block:(k + 1) * block] = level_values(f, name, levels[:, k * block:(k + 1) * block])
    packed = np.concatenate([pack_levels(f, name, levels[:, k * block:(k + 1) * block])
                             for k, f in enumerate(fields)], axis=1)
    return packed, values


class HessianCollector:
    """X^T X (float64) and the token count of every watched linear layer's input, over forward passes. Layers fed
    the same tensor (q/k/v, gate/up) share one sum: computed once, and one factor later."""

    def __init__(self):
        self.sums, self.tokens, self.same_as = {}, {}, {}
        self._last = None

    def watch(self, module, names: dict):
        """Hooks on module's linear layers named in `names` ({layer name in module: key}); returns the handles."""
        handles = []
        for layer_name, layer in quantizable_layers(module):
            key = names.get(layer_name)
            if key is not None:
                handles.append(layer.register_forward_pre_hook(self._hook(key)))
        return handles

    def _hook(self, key):
        def hook(module, args):
            x = args[0]
            last_x, last_key = self._last or (None, None)
            if x is last_x and key not in self.sums:  # the very tensor the previous layer was given
                if self.same_as.setdefault(key, last_key) != last_key:
                    raise RuntimeError(f"{key}: fed another layer's input than on the first pass")
                return
            if key in self.same_as:
                raise RuntimeError(f"{key}: fed its own input after sharing {self.same_as[key]}'s")
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            xtx = (flat.T @ flat).to(torch.float64)
            self.sums[key] = self.sums[key] + xtx if key in self.sums else xtx
            self.tokens[key] = self.tokens.get(key, 0) + flat.shape[0]
            self._last = (x, key)
        return hook

    def source(self, key):
        return self.same_as.get(key, key)

    def hessian(self, key) -> torch.Tensor:
        key = self.source(key)
        return self.sums[key] / max(1, self.tokens[key])


def round_plan(source, ckpt, types: dict, importance: dict | None, gguf_names: dict, layout, work_dir: Path,
               tokens: int = GPTQ_TOKENS, calib_text=None, progress: bool = True) -> dict:
    """Every block matrix of `types` ({checkpoint name: ggml type}) that GPTQ can round, rounded with error feedback
    on `tokens` calibration tokens: {GGUF name: path of its bytes (.npy, in work_dir)}. importance: {GGUF name: [cols]}
    (the scales' search, as llama-quantize --imatrix), or None. layout(name, tensor): the tensor in llama.cpp's
    layout (rows permuted for q/k; rows are independent, so the rounding is the same)."""
    from .source import load_tokenizer
    from .stream import StreamedModel

    prefix = ckpt.block_prefix + "."
    todo = {n: t for n, t in types.items() if n.startswith(prefix) and can_round(t)}
    if not todo:
        return {}
    corpus = load_corpus(calib_text)
    try:
        windows = make_windows(load_tokenizer(source.path), corpus, tokens, 256, from_end=True)
    except EWQError:  # (its advice names the evaluation's flag)
        raise EWQError(f"--gptq-tokens {tokens}: {corpus.name} has fewer tokens than that; lower --gptq-tokens or "
                       f"give a longer --calib-text") from None
    sm = StreamedModel(source.path, ckpt, torch.float32, "decoder", [{"input_ids": w} for w in windows.split(BATCH)])
    out = {}
    with torch.no_grad():
        states = sm.capture()
        bar = tqdm(total=len(todo), desc="GPTQ rounding", unit="matrix", disable=not progress, leave=False)
        for i in range(len(sm.blocks)):
            mine = {n[len(f"{prefix}{i}."):-len(".weight")]: n for n in todo if n.startswith(f"{prefix}{i}.")}
            block = sm.block(i)
            collector = HessianCollector()
            handles = collector.watch(block, mine)
            try:
                states = [sm.run_block(i, h, b) for b, h in enumerate(states)]
            finally:
                for h in handles:
                    h.remove()
            factors = {}
            for layer_name, name in mine.items():
                source_key = collector.source(name)
                if source_key not in factors:
                    factors[source_key] = inverse_factor(collector.hessian(name))
                weight = layout(name, block.get_submodule(layer_name).weight.detach().to(torch.float32))
                gname = gguf_names[name]
                packed, _ = gptq_round(weight, todo[name], factors[source_key], (importance or {}).get(gname))
                path = Path(work_dir) / f"{gname}.npy"
                np.save(path, packed)
                out[gname] = path
                bar.update(1)
            del factors, collector
        bar.close()
    sm.release()
    return out


def work_dir_beside(out: Path) -> Path:
    """A temporary folder beside the output for the rounded matrices (the file's size on disk, removed after)."""
    return Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.gptq.", dir=Path(out).parent))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
