"""The two entropy definitions, computed one tensor at a time.

histogram (the published PoC's, default): Shannon entropy in bits of a 128-bin histogram over
    [min, max] of a weight matrix cast to fp16, zero bins dropped. fp16 has only 65,536 bit patterns,
    so we count patterns with one bincount pass and histogram the distinct values weighted by their
    counts: np.histogram gives the same bins as on the full array, in a fraction of the time.
softmax (the paper's): H = -sum p log p with p = softmax over the flattened matrix, in nats,
    divided by ln(n) so matrices (and blocks) of different sizes compare on [0, 1]. Streaming form:
    with m = max(w), S = sum exp(w - m), T = sum exp(w - m) (w - m):  H = ln S - T / S.

A block's entropy is the parameter-weighted mean over its matrices (`block_entropy`).
"""

import math

import numpy as np
import torch

ENTROPY_KINDS = ("histogram", "softmax")
HIST_BINS = 128
CHUNK = 1 << 22  # elements per pass: bounds the temporary int32/float64 copies to 16-32 MB

FP16_VALUES = np.arange(65536, dtype=np.uint16).view(np.float16)
FP16_FINITE = np.isfinite(FP16_VALUES)


def fp16_pattern_counts(weight: torch.Tensor) -> np.ndarray:
    """How often each of the 65,536 fp16 bit patterns occurs in `weight` (cast to fp16 like the PoC)."""
    bits = weight.reshape(-1).to(torch.float16).view(torch.int16)
    counts = torch.zeros(65536, dtype=torch.int64)
    for chunk in bits.split(CHUNK):
        counts += torch.bincount(chunk.to(torch.int32) & 0xFFFF, minlength=65536)
    return counts.numpy()


def histogram_entropy(weight: torch.Tensor, bins: int = HIST_BINS) -> float:
    """Entropy in bits of the `bins`-bin histogram of `weight` as fp16 (np.histogram's binning)."""
    counts = fp16_pattern_counts(weight)
    keep = (counts > 0) & FP16_FINITE
    if not keep.any():
        return 0.0
    hist, _ = np.histogram(FP16_VALUES[keep], bins=bins, weights=counts[keep])
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def softmax_entropy(weight: torch.Tensor) -> float:
    """Entropy of softmax(flattened weight), in nats, normalised by ln(n) to [0, 1]."""
    flat = weight.reshape(-1)
    n = flat.numel()
    if n < 2:
        return 0.0
    m = flat.max().double()
    s = torch.zeros((), dtype=torch.float64)
    t = torch.zeros((), dtype=torch.float64)
    for chunk in flat.split(CHUNK):
        x = chunk.double() - m
        e = torch.exp(x)
        s += e.sum()
        t += (e * x).sum()
    return float((torch.log(s) - t / s) / math.log(n))


def poc_histogram_entropy(weight: torch.Tensor, bins: int = HIST_BINS) -> float:
    """The published PoC's computation, kept as the reference: np.histogram over the fp16 weights.
    Exact but slow (tens of M params/s); tests and bench/plan_speed.py compare against it."""
    hist, _ = np.histogram(weight.detach().float().cpu().numpy().astype(np.float16).ravel(), bins=bins)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


ENTROPY_FUNCTIONS = {"histogram": histogram_entropy, "softmax": softmax_entropy}


def block_entropy(entropies, params) -> float:
    """Parameter-weighted mean of the entropies of a block's matrices."""
    total = sum(params)
    return sum(h * n for h, n in zip(entropies, params)) / total
