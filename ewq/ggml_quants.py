"""Emulation of llama.cpp's ggml weight quantizers in torch, so a sweep can measure what `llama-quantize`
would do to each matrix without building or running llama.cpp.

What is emulated is `ggml_quantize_chunk(type, ..., imatrix)`, the call llama-quantize makes per tensor, with
imatrix NULL (no --imatrix, or a tensor the imatrix does not name) or the tensor's importance per input column
(`importance=`: llama-quantize --imatrix FILE, what ewq.imatrix reads or collects). Without importance every
type ends in ggml-quants.c's `quantize_row_<type>_ref`:

    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1  round-to-grid from the block's max (or min/max)
    Q6_K                          make_qx_quants(16, 32, rmse_type=1, qw=NULL) per 16-weight sub-block
    Q5_K / Q4_K                   make_qkx2_quants(32, 31|15, weights=av_x+|x|) per 32-weight sub-block
    Q3_K                          make_q3_quants(16, 4, do_rmse=true) per 16-weight sub-block
    Q2_K                          make_qkx2_quants(16, 3, weights=|x|, use_mad=true) per 16-weight sub-block
    IQ4_NL / IQ4_XS               quantize_row_iq4_nl_impl(ntry=7, weights x^2): 16 non-linear levels, a scale per
                                  32 (IQ4_XS: 6-bit scales under an fp16 per 256)

With importance qw, `quantize_row_<type>_impl` (weights qw*sqrt(sigma2 + x^2), sigma2 the mean x^2 of the row for
the 32-weight types, of the super-block, doubled, for the k-quants):

    Q8_0                          ignores it
    Q4_0 / Q5_0                   make_qx_quants(32, 8|16, weights) and its levels as stored
    Q4_1 / Q5_1                   make_qkx3_quants(32, 15|31, weights, -0.9, 0.05, 36)
    Q6_K                          make_qx_quants(16, 32, qw itself)
    Q5_K / Q4_K                   make_qkx3_quants(32, ..., 36 steps); scales and mins by make_qp_quants(8, 63, .)
    Q3_K                          make_qx_quants(16, 4, weights); scales by make_qx_quants(16, 32, scales, sums)
    Q2_K                          make_qkx3_quants(16, 3, ...); scales and mins by make_qp_quants(16, 15, .)
    IQ4_NL / IQ4_XS               the same search, weighted

Exactness: the C is plain float32 arithmetic (ggml-base is built without -march, so x86-64 SSE without FMA
contraction) with sequential sums, and this module repeats it operation for operation: the same association of
products, sums accumulated element by element in the same order (`_seqsum`; torch.sum reorders), IEEE division
(never `python_scalar / tensor`, which torch computes as tensor.reciprocal() * scalar), a correctly rounded sqrt
(torch.sqrt on float32 CPU tensors is off by one ulp for ~20% of inputs), the same first-index tie-breaking for
max |x|, `nearest_int`'s round-half-to-even, `roundf`'s round-half-away-from-zero, fp16 rounding of the stored
scales, and even ggml's signs of zero. On x86-64 the result is bit-identical to ggml, output values and packed
bytes (bench/check_ggml_quants.py: every type, Gaussian and all tested SmolLM2 tensors, the 49152x576 embedding
included; with and without --imatrix, and whole llama-quantize --imatrix files byte for byte). Known limits: a ggml
built for aarch64 may contract `a*b+c` into FMAs, which can move a k-quant scale
choice in rare blocks; and blocks made only of float32-subnormal values (|x| < ~1e-38, where 1/d overflows and
ggml relies on undefined float->int conversions) are not reproduced.

Everything is vectorised over all blocks of a matrix (processed in chunks to bound memory); the only Python loops
are over the 16/32 elements of a sub-block (the sequential sums) and over the handful of candidate scales.

Public API:
    TYPES, TypeInfo                    block size, bytes per block, bits per weight (from gguf.GGML_QUANT_SIZES)
    EMULATED_TYPES                     the quantized types quantize_dequantize emulates
    can_quantize(shape, type_name)     whether a [rows, cols] matrix can take the type
    check_shape(shape, type_name)      the same, raising EWQError with llama-quantize's fallback in the message
    llama_quantize_fallback(type_name, n_cols)   the type llama-quantize really writes for that row length
    uses_importance(type_name)         whether an importance matrix changes the type's rounding (not Q8_0)
    quantize_dequantize(weight, type_name, *, importance=None, threads=1) -> float32, the weight after one round trip
    quantize_to_bytes(weight, type_name, *, importance=None, threads=1)   -> numpy uint8 [rows, row_bytes]
    round_activations(x, type_name)    a product's input as ggml's CPU backend rounds it for weights of that type
    block_grid, level_values, pack_levels, row_sigma2, GRID_LEVELS, AFFINE_GRID   a block's scales as ggml picks
                                       them, the values each weight can take under them, the values and bytes of any
                                       choice (ewq.gptq rounds with them)

Both round with ggml's own C instead where the llama.cpp emulated here is installed (ewq.ggml_native: the same
bytes, 2-8x faster but for Q8_0); EWQ_GGML_LIB=off keeps the emulation.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import gguf
import numpy as np
import torch

from ewq import ggml_native
from ewq.common import EWQError
from ewq.ggml_types import FLOAT_TYPES, GGML_TYPES, NEEDS_IMPORTANCE, VEC_DOT_TYPE, bits_per_weight
from ewq.ggml_types import block as ggml_block
from ewq.ggml_types import llama_quantize_fallback as _llama_quantize_fallback

QK_K = 256
# ggml-quants.c: a group whose max |x| is below this is written as all zeros
GROUP_MAX_EPS = 1e-15
# Weights per chunk. The k-quant searches run ~100-700 small tensor ops per chunk, so chunks must be large
# enough to amortise Python overhead; Q6_K's [16 elements, 19 candidates, sub-blocks] tensors want to stay
# cache-sized (measured on 1 thread: 2^16 is ~2x faster than 2^18 for Q6_K, 2^18 ~2x faster than 2^16 for Q4_K).
_CHUNK_WEIGHTS = 1 << 18
_CHUNK_WEIGHTS_BY_TYPE = {"Q6_K": 1 << 16, "IQ4_NL": 1 << 16, "IQ4_XS": 1 << 16, "IQ3_S": 1 << 16, "IQ2_XS": 1 << 15}
# with an importance matrix Q4_0/Q5_0 run make_qx_quants' 19 grids at once ([32, 19, blocks] tensors): small chunks
_CHUNK_WEIGHTS_IMATRIX = {"Q4_0": 1 << 14, "Q5_0": 1 << 14}


@dataclass(frozen=True)
class TypeInfo:
    block_size: int        # weights per block (the row length must be a multiple of it)
    bytes_per_block: int
    bits_per_weight: float  # exact: 8 * bytes_per_block / block_size


EMULATED_TYPES = GGML_TYPES  # every type a plan may name (tests check each has its quantizer here)


TYPES: dict[str, TypeInfo] = {name: TypeInfo(*ggml_block(name), bits_per_weight(name))
                               for name in FLOAT_TYPES + EMULATED_TYPES}


def _canonical(type_name: str) -> str:
    name = str(type_name).upper()
    if name not in TYPES:
        raise EWQError(f"unknown ggml type {type_name!r}; supported: {', '.join(TYPES)}")
    return name


def can_quantize(shape, type_name: str) -> bool:
    """True when every row (the last dimension, ggml's ne[0]) splits into whole blocks of the type."""
    info = TYPES[_canonical(type_name)]
    return len(shape) >= 1 and shape[-1] > 0 and shape[-1] % info.block_size == 0


def llama_quantize_fallback(type_name: str, n_cols: int) -> str:
    """The type llama-quantize actually writes for rows of n_cols weights (ewq.ggml_types.llama_quantize_fallback).
    The output tensor (and a tied token_embd) whose rows do not fit the mixture's block gets Q8_0 instead of Q6_K
    (ewq.presets)."""
    return _llama_quantize_fallback(_canonical(type_name), n_cols)


def check_shape(shape, type_name: str) -> None:
    """Refuse a shape the type cannot take, naming what llama-quantize would write instead."""
    name = _canonical(type_name)
    shape = tuple(shape)
    if len(shape) != 2:
        raise EWQError(f"ggml quantization emulation takes a 2-D [rows, cols] weight, got shape {shape}")
    if not can_quantize(shape, name):
        block = TYPES[name].block_size
        raise EWQError(
            f"{name} needs rows whose length is a multiple of {block}; shape {shape} has rows of {shape[-1]} "
            f"(llama-quantize would fall back to {llama_quantize_fallback(name, shape[-1])})")


# ---------------------------------------------------------------------------------------------------- helpers

def _f32(value) -> torch.Tensor:
    """A 0-dim float32 constant: the C literal `value f`, and a tensor so every division is a true division."""
    return torch.tensor(value, dtype=torch.float32)


_ONE = _f32(1.0)
_EPS = _f32(GROUP_MAX_EPS)
_MAGIC = _f32(12582912.0)  # 1.5 * 2^23


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int(): add 1.5*2^23 and read the low mantissa bits. Round half to even for |f| < 2^22;
    reproduced bit for bit (also its garbage for larger |f|) since a few callers divide by tiny numbers."""
    bits = (f + _MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _round_small(f: torch.Tensor) -> torch.Tensor:
    """nearest_int() where |f| is bounded by construction (the scale searches): torch.round is half-to-even
    too, and stays float, which saves the int conversions in the hot loops."""
    return torch.round(f)


def _levels(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(f))) as float32 ints. The + 0.0 turns the -0.0 that torch.round gives for
    small negatives into the integer 0 C has; a -0.0 level would make 0 * L come out as -0.0."""
    return _round_small(f).clamp_(lo, hi).add_(0.0)


def _roundf(f: torch.Tensor) -> torch.Tensor:
    """C roundf(): half away from zero (Q8_0). x - trunc(x) is exact, so this has no double-rounding trap."""
    t = torch.trunc(f)
    return t + torch.sign(f) * ((f - t).abs() >= 0.5).to(f.dtype)


def _fp16(f: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 value ggml stores (GGML_FP32_TO_FP16 rounds to nearest even, keeps subnormals)."""
    return f.to(torch.float16)


def _sqrtf(f: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt, as C sqrtf. torch.sqrt on float32 CPU tensors is NOT: its vectorised
    kernel is off by one ulp for ~20% of inputs, enough to move a Q4_K/Q5_K scale. The float64 sqrt of a float32,
    rounded to float32, is correctly rounded (53 >= 2*24 + 2 bits)."""
    return torch.sqrt(f.double()).float()


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 one element at a time in float32, like the C loops `s += ...` starting from 0.
    (torch.sum reduces in another order, which can change the last bit, enough to flip the
    `cur_error < best_error` comparisons of the scale searches.)"""
    acc = torch.zeros_like(t[0])
    for i in range(t.shape[0]):
        acc = acc + t[i]
    return acc


def _first_absmax(x: torch.Tensor, dim: int):
    """(signed value, |value|) of the first element with the largest |x| along dim, ggml's
    `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`."""
    ax = x.abs()
    idx = ax.argmax(dim, keepdim=True)  # first index of the maximum
    return x.gather(dim, idx).squeeze(dim), ax.gather(dim, idx).squeeze(dim)


def _max_from_zero(t: torch.Tensor) -> torch.Tensor:
    """ggml's `float m = 0; if (v > m) m = v;` over dim 1: +0.0 unless something is positive (clamp_min(0)
    would keep a -0.0, which ends up as a -0.0 fp16 scale and -0.0 outputs)."""
    m = t.amax(1)
    return _where0(m > 0, m)


def _where0(cond, value):
    return torch.where(cond, value, torch.zeros((), dtype=value.dtype))


def _to_u8(i: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t (wraps)."""
    return i & 0xFF


# ------------------------------------------------------------------------------------ 32-weight legacy types
# Each _quant_* takes blocks [nb, block] float32 and returns the stored fields (fp16 scales as float16 tensors,
# quant levels L as small non-negative ints held in float32 or int); _dequant_* repeats ggml's dequantize_row_*.

def _quant_q8_0(xb):
    amax = xb.abs().amax(1)
    d = amax / _f32(127.0)
    inv = _where0(d != 0, _ONE / d)
    q = _roundf(xb * inv[:, None]).to(torch.int32)  # int8 in [-127, 127]; an int, so -0.0 becomes 0
    return {"d": _fp16(d), "q": q}


def _dequant_q8_0(f):
    return f["q"].float() * f["d"].float()[:, None]


def _quant_symmetric(xb, half: int):
    """Q4_0 (half = 8) and Q5_0 (half = 16): d = max / -half from the signed value of largest magnitude."""
    mx, _ = _first_absmax(xb, 1)
    d = mx / _f32(-float(half))
    inv = _where0(d != 0, _ONE / d)
    # (int8_t)(x*id + half + 0.5f) truncates toward zero; the argument is positive, then MIN(2 * half - 1, .)
    L = torch.trunc(xb * inv[:, None] + _f32(half + 0.5)).clamp_max(2 * half - 1)
    return {"d": _fp16(d), "L": L}


def _quant_q4_0(xb):
    return _quant_symmetric(xb, 8)


def _quant_q5_0(xb):
    return _quant_symmetric(xb, 16)


def _dequant_q4_0(f):
    return (f["L"] - 8) * f["d"].float()[:, None]


def _dequant_q5_0(f):
    return (f["L"] - 16) * f["d"].float()[:, None]


def _quant_q4_1(xb):
    mn = xb.amin(1)
    mx = xb.amax(1)
    d = (mx - mn) / _f32(15.0)
    inv = _where0(d != 0, _ONE / d)
    L = torch.trunc((xb - mn[:, None]) * inv[:, None] + _f32(0.5)).clamp_max(15)
    return {"d": _fp16(d), "m": _fp16(mn), "L": L}


def _dequant_q4_1(f):
    return f["L"] * f["d"].float()[:, None] + f["m"].float()[:, None]


def _quant_q5_1(xb):
    mn = xb.amin(1)
    mx = xb.amax(1)
    d = (mx - mn) / _f32(31.0)
    inv = _where0(d != 0, _ONE / d)
    # ggml has no MIN(31, .) here ((uint8_t)(x + 0.5f)); (max-min)*id stays below 31.5 so it never matters.
    # gguf-py clips to 31 instead; same result.
    L = torch.trunc((xb - mn[:, None]) * inv[:, None] + _f32(0.5))
    return {"d": _fp16(d), "m": _fp16(mn), "L": L}


def _dequant_q5_1(f):
    return f["L"] * f["d"].float()[:, None] + f["m"].float()[:, None]


# ---------------------------------------------------------------------------------------- k-quant searches
# Sub-block tensors are element-major, [n, B] (n = 16 or 32 weights, B sub-blocks), so the sequential sums over
# the n elements walk contiguous rows.

def _make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """ggml make_qkx2_quants: asymmetric (scale, min) fit of levels 0..nmax. Starts from the min/max grid, then
    tries nstep+1 grids iscale = (rmin + rdelta*is + nmax)/(max - min), each followed by a weighted
    least-squares (scale, min), keeping a fit whose weighted error (squared, or absolute if use_mad) is strictly
    lower. The steps are sequential on purpose: ggml's `min` is updated when a fit is kept, and the later grids
    use the new min (both in max - min and in x - min), so the search depends on its path.
    Returns (scale [B], the_min = -min [B], L [n, B] float)."""
    n = x.shape[0]
    mn = x.amin(0)
    mx = x.amax(0)
    sum_w = w[0].clone()
    sum_x = w[0] * x[0]
    for i in range(1, n):
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    mn = _where0(~(mn > 0), mn)  # if (min > 0) min = 0;
    flat = mx == mn
    iscale = _f32(float(nmax)) / (mx - mn)
    scale = _ONE / iscale
    L = _levels(iscale * (x - mn), 0, nmax)
    diff = scale * L + mn - x
    best = _seqsum(w * (diff.abs() if use_mad else diff * diff))
    # the levels kept so far are round(l_iscale * (x - l_min)): track those two [B] vectors and rebuild the
    # levels once at the end, rather than selecting an [n, B] tensor at every step
    l_iscale, l_min = iscale, mn

    terms = torch.empty((n, 3) + x.shape[1:], dtype=x.dtype)  # w*l, w*l*l, w*l*x side by side: one sum loop
    for s in range(nstep + 1):
        # (rmin + rdelta*is + nmax) evaluated in float32, left to right, as in C
        fac = _f32(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(s)) + np.float32(nmax))
        iscale = fac / (mx - mn)
        Laux = _levels(iscale * (x - mn), 0, nmax)
        wl = torch.mul(w, Laux, out=terms[:, 0])
        torch.mul(wl, Laux, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = _seqsum(terms)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0  # a positive min is not allowed: refit the scale alone
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = _where0(~pos, this_min)
        diff = this_scale * Laux + this_min - x
        cur = _seqsum(w * (diff.abs() if use_mad else diff * diff))
        take = (D > 0) & (cur < best)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        l_iscale = torch.where(take, iscale, l_iscale)
        l_min = torch.where(take, mn, l_min)
        mn = torch.where(take, this_min, mn)  # later grids start from the new min
    L = _levels(l_iscale * (x - l_min), 0, nmax)
    # max == min: all levels 0, scale 0, the_min = -min
    L = _where0(~flat[None], L)
    scale = _where0(~flat, scale)
    return scale, -mn, L


def _make_qx_quants_rmse1(x, nmax: int, w=None):
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric levels -nmax..nmax-1 weighted by qw (x^2 when
    qw is NULL). Tries iscale = -nmax/max, then -(nmax + 0.1*is)/max for is = -9..9 (not 0), keeping a candidate
    when sumlx^2/suml2 grows. Returns (scale [B], L [n, B] float in 0..2*nmax-1; all 0 for an all-zero group)."""
    mx, amax = _first_absmax(x, 0)
    zero = amax < _EPS
    w = x * x if w is None else w
    wx = w * x
    steps = [0] + [s for s in range(-9, 10) if s != 0]
    facs = [np.float32(nmax)] + [np.float32(nmax) + np.float32(0.1) * np.float32(s) for s in steps[1:]]
    iscales = torch.tensor(-np.array(facs, dtype=np.float32))[:, None] / mx[None, :]  # [S, B]
    lv = _round_small(iscales[None] * x[:, None]).clamp_(-nmax, nmax - 1)  # [n, S, B]
    sumlx = _seqsum(wx[:, None] * lv)
    suml2 = _seqsum((w[:, None] * lv) * lv)
    scale = _where0(suml2[0] != 0, sumlx[0] / suml2[0])
    best = scale * sumlx[0]
    choice = torch.zeros_like(mx, dtype=torch.long)
    for s in range(1, len(steps)):
        take = (suml2[s] > 0) & (sumlx[s] * sumlx[s] > best * suml2[s])
        scale = torch.where(take, sumlx[s] / suml2[s], scale)
        best = torch.where(take, scale * sumlx[s], best)
        choice = torch.where(take, s, choice)
    n = x.shape[0]
    L = lv.gather(1, choice[None, None, :].expand(n, 1, -1)).squeeze(1) + nmax
    return _where0(~zero, scale), _where0(~zero[None], L)


def _make_q3_quants_rmse(x, nmax: int):
    """ggml make_q3_quants(n, nmax, x, L, do_rmse=true): levels -nmax..nmax-1 from -nmax/max, then up to 5 passes
    of coordinate descent on each level, weighted by x^2. A pass without a change leaves the state as it was,
    so running all 5 passes for every sub-block equals ggml's early break. Returns (scale [B], L [n, B] float)."""
    n = x.shape[0]
    mx, amax = _first_absmax(x, 0)
    zero = amax < _EPS
    iscale = _f32(float(-nmax)) / mx
    L = _round_small(iscale[None] * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum((w * L) * L)
    L = list(L)
    for _ in range(5):
        for i in range(n):
            slx = sumlx - wx[i] * L[i]
            sl2 = suml2 - (w[i] * L[i]) * L[i]
            # x*sl2/slx can be huge when slx is tiny: keep nearest_int's exact bit behaviour there
            new_l = _nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1).float()
            slx2 = slx + wx[i] * new_l
            sl22 = sl2 + (w[i] * new_l) * new_l
            take = ((slx > 0) & (new_l != L[i]) & (sl22 > 0)
                    & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            L[i] = torch.where(take, new_l, L[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    L = torch.stack(L) + nmax
    scale = _where0(suml2 > 0, sumlx / suml2)
    return _where0(~zero, scale), _where0(~zero[None], L)


def _make_qp_quants(x, nmax: int, w):
    """ggml make_qp_quants(n, nmax, x, L, quant_weights=w): non-negative levels 0..nmax of the super-block's scales
    (or mins) x [n, B], weighted by w: the grid nmax/max, then (nmax + 0.1*is)/max for is = -4..4 (not 0) kept on a
    strictly lower weighted squared error, then up to 5 passes of coordinate descent on each level. L is a uint8_t
    in C: a negative level (only from a negative scale) wraps, and the wrapped value is what later steps read.
    Returns (scale [B], L [n, B] float)."""
    n = x.shape[0]
    mx = _max_from_zero(x.T)
    zero = mx < _EPS
    iscale = _f32(float(nmax)) / mx
    L = torch.remainder(_nearest_int(iscale * x), 256).float()  # uint8_t L[i] = nearest_int(...)
    scale = _ONE / iscale
    diff = x - scale * L
    best = _seqsum((w * diff) * diff)
    for s in [s for s in range(-4, 5) if s != 0]:
        fac = _f32(np.float32(np.float32(0.1) * np.float32(s)) + np.float32(nmax))
        iscale_s = fac / mx
        lv = _nearest_int(iscale_s * x).clamp_max(nmax).float()
        diff = x - (_ONE / iscale_s) * lv
        mse = _seqsum((w * diff) * diff)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, iscale_s, iscale)
    lv = _nearest_int(iscale * x).clamp_max(nmax).float()
    wx = w * x
    sumlx = _seqsum(wx * lv)
    suml2 = _seqsum((w * lv) * lv)
    L = list(torch.remainder(lv, 256))
    for _ in range(5):  # a pass without a change leaves the state as it was: 5 passes equal ggml's early break
        for i in range(n):
            slx = sumlx - wx[i] * L[i]
            sl2 = suml2 - (w[i] * L[i]) * L[i]
            new_l = _nearest_int(x[i] * sl2 / slx).clamp_max(nmax).float()
            slx2 = slx + wx[i] * new_l
            sl22 = sl2 + (w[i] * new_l) * new_l
            take = ((slx > 0) & (sl2 > 0) & (new_l != L[i])
                    & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            L[i] = torch.where(take, torch.remainder(new_l, 256), L[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = _where0(suml2 > 0, sumlx / suml2)
    return _where0(~zero, scale), _where0(~zero[None], torch.stack(L))


# IQ4_NL / IQ4_XS: 16 non-linear levels (ggml-common.h kvalues_iq4nl)
_IQ4_VALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                           dtype=torch.float32)


def _iq4_tables():
    """For each integer k in -128..127: mu = the first level index with kvalues[mu] > k (1..15), and the levels
    kvalues[mu-1], kvalues[mu]. The levels are integers, so for a value al strictly inside the level range
    kvalues[mu] > al exactly when kvalues[mu] > floor(al): the binary search becomes a table lookup."""
    v = _IQ4_VALUES
    k = torch.arange(-128, 128, dtype=torch.float32)
    mu = torch.searchsorted(v, k, right=True).clamp_(1, 15)
    return mu, v[mu - 1], v[mu]


_IQ4_MU, _IQ4_LO, _IQ4_HI = _iq4_tables()


def _best_index_iq4(al: torch.Tensor) -> torch.Tensor:
    """ggml best_index_int8(16, kvalues_iq4nl, al): the nearest level, ties to the upper one; long indices."""
    k = torch.nan_to_num(al, nan=0.0).floor_().clamp_(-128, 127).add_(128).long()  # NaN only in all-zero blocks
    lower = (al - _IQ4_LO[k]) < (_IQ4_HI[k] - al)
    idx = _IQ4_MU[k] - lower.long()
    idx = torch.where(al <= _IQ4_VALUES[0], 0, idx)
    return torch.where(al >= _IQ4_VALUES[15], 15, idx)


def _iq4_scales(x, w, ntry: int = 7):
    """The per-32 scale search of quantize_row_iq4_nl_impl (ntry = 7, what ggml_quantize_chunk uses), over
    element-major sub-blocks x, w [32, B]: d = max/127 grid, least-squares scale, then ntry*2+1 grids
    (itry - 127)/max, keeping the scale when sumqx^2/sumq2 grows. The grids' sums are independent of one another, so
    all are computed at once (one sequential sum over the 32 elements); only the keep/replace walk is in order.
    Returns d [B] (0 for an all-zero sub-block)."""
    mx, amax = _first_absmax(x, 0)
    zero = amax < _EPS
    # inverse scales [T, B]: first 1/d with d = -max/-127, then (itry - 127)/max for itry = -ntry..ntry
    first = _ONE / ((-mx) / _f32(-127.0))
    grids = torch.tensor([float(t - 127) for t in range(-ntry, ntry + 1)], dtype=torch.float32)[:, None] / mx[None]
    inv = torch.cat([first[None], grids])
    q = _IQ4_VALUES[_best_index_iq4(inv[None] * x[:, None])]  # [32, T, B]
    wq = w[:, None] * q
    sumqx, sumq2 = _seqsum(torch.stack([wq * x[:, None], wq * q], 1))  # each [T, B]
    d = _where0(sumq2[0] > 0, sumqx[0] / sumq2[0])
    best = d * sumqx[0]
    for t in range(1, inv.shape[0]):
        take = (sumq2[t] > 0) & (sumqx[t] * sumqx[t] > best * sumq2[t])
        d = torch.where(take, sumqx[t] / sumq2[t], d)
        best = torch.where(take, d * sumqx[t], best)
    return _where0(~zero, d)


def _safe_inv(d):
    """`d ? 1/d : 0`"""
    return _where0(d != 0, _ONE / torch.where(d != 0, d, _ONE))


def _row_sigma2(xb, n_per_row: int, factor: float = 1.0):
    """sum of x^2 over each group of n_per_row consecutive weights, accumulated in order in float32 (np.cumsum is a
    sequential accumulate, unlike a pairwise reduce), times factor / n_per_row as ggml writes it: [groups]."""
    x2 = (xb.reshape(-1, n_per_row) ** 2).numpy()
    total = torch.from_numpy(np.cumsum(x2, axis=1, dtype=np.float32)[:, -1].copy())
    return (total * _f32(factor) if factor != 1.0 else total) / _f32(float(n_per_row))


def _importance_weights(xb, qw, sigma2):
    """weight = qw * sqrtf(sigma2 + x*x) (the imatrix paths), sigma2 broadcast per row of xb."""
    return qw * _sqrtf(sigma2[:, None] + xb * xb)


# ------------------------------------------------------------------------------------------- k-quant types

def _subblocks(xb, n):
    """[nb, 256] -> element-major [n, nb*256/n]."""
    return xb.reshape(-1, n).T.contiguous()


def _quant_qk_min(xb, nmax, rmin, rdelta, nstep):
    """Q4_K / Q5_K (quantize_row_q{4,5}_K_ref): 8 sub-blocks of 32, make_qkx2_quants weighted by
    av_x + |x| with av_x = sqrt(mean x^2 of the sub-block); scales and mins requantized to 6 bits against the
    super-block's fp16 d = max_scale/63 and dmin = max_min/63; then every weight is requantized with the final
    (d*sc, dmin*m)."""
    nb = xb.shape[0]
    xs = _subblocks(xb, 32)
    sum_x2 = _seqsum(xs * xs)
    av_x = _sqrtf(sum_x2 / _f32(32.0))
    w = av_x[None] + xs.abs()
    scale, the_min, Ls = _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad=False)
    scales = scale.view(nb, 8)
    mins = the_min.view(nb, 8)
    Ls = Ls.T.reshape(nb, 8, 32)
    max_scale = _max_from_zero(scales)
    max_min = _max_from_zero(mins)
    inv_scale = _where0(max_scale > 0, _f32(63.0) / max_scale)
    inv_min = _where0(max_min > 0, _f32(63.0) / max_min)
    ls = _to_u8(_nearest_int(inv_scale[:, None] * scales)).clamp_max(63)
    lm = _to_u8(_nearest_int(inv_min[:, None] * mins)).clamp_max(63)
    d = _fp16(max_scale / _f32(63.0))
    dmin = _fp16(max_min / _f32(63.0))
    dd = d.float()[:, None] * ls.float()
    dm = dmin.float()[:, None] * lm.float()
    xr = xb.view(nb, 8, 32)
    Lq = _nearest_int((xr + dm[..., None]) / dd[..., None]).clamp(0, nmax).float()
    L = torch.where(dd[..., None] != 0, Lq, Ls)  # `if (!d) continue;` keeps the search's levels
    return {"d": d, "dmin": dmin, "ls": ls, "lm": lm, "L": L.reshape(nb, QK_K)}


def _dequant_qk_min(f):
    nb = f["d"].shape[0]
    dd = f["d"].float()[:, None] * f["ls"].float()
    dm = f["dmin"].float()[:, None] * f["lm"].float()
    return (dd[..., None] * f["L"].view(nb, 8, 32) - dm[..., None]).reshape(nb, QK_K)


def _quant_q4_k(xb):
    # make_qkx2_quants(32, 15, ..., rmin=-1.0, rdelta=0.1, nstep=20, use_mad=false)
    return _quant_qk_min(xb, 15, -1.0, 0.1, 20)


def _quant_q5_k(xb):
    # make_qkx2_quants(32, 31, ..., rmin=-0.5, rdelta=0.1, nstep=15, use_mad=false)
    return _quant_qk_min(xb, 31, -0.5, 0.1, 15)


def _quant_q6_k(xb, qw=None):
    """quantize_row_q6_K_ref: 16 sub-blocks of 16, make_qx_quants(16, 32, rmse_type=1); the signed scale with the
    largest |scale| sets iscale = -128/max_scale, d = fp16(1/iscale), 8-bit scales MIN(127, nearest_int(.));
    weights requantized to -32..31 with d*sc. A super-block with max |scale| < GROUP_MAX_EPS is all zeros.
    With an imatrix (quantize_row_q6_K_impl) the same, the importance itself weighting make_qx_quants."""
    nb = xb.shape[0]
    xs = _subblocks(xb, 16)
    scale, Ls = _make_qx_quants_rmse1(xs, 32, None if qw is None else _subblocks(qw, 16))
    scales = scale.view(nb, 16)
    Ls = Ls.T.reshape(nb, 16, 16)
    max_scale, max_abs = _first_absmax(scales, 1)
    zero = max_abs < _EPS
    iscale = _f32(-128.0) / max_scale
    d = _fp16(_where0(~zero, _ONE / iscale))
    sc = _nearest_int(iscale[:, None] * scales).clamp_max(127)
    sc = ((sc + 128) & 0xFF) - 128  # stored as int8_t
    sc = _where0(~zero[:, None], sc)
    dd = d.float()[:, None] * sc.float()
    Lq = (_nearest_int(xb.view(nb, 16, 16) / dd[..., None]).clamp(-32, 31) + 32).float()
    L = torch.where(dd[..., None] != 0, Lq, Ls)
    L = _where0(~zero[:, None, None], L)  # memset(&y[i], 0, ...)
    return {"d": d, "sc": sc, "L": L.reshape(nb, QK_K)}


def _dequant_q6_k(f):
    nb = f["d"].shape[0]
    dd = f["d"].float()[:, None] * f["sc"].float()
    return (dd[..., None] * (f["L"].view(nb, 16, 16) - 32)).reshape(nb, QK_K)


def _quant_q3_k(xb):
    """quantize_row_q3_K_ref: 16 sub-blocks of 16, make_q3_quants(16, 4, do_rmse=true); 6-bit signed scales
    against iscale = -32/max_scale (max_scale = the scale with the largest |scale|), d = fp16(1/iscale);
    weights requantized to -4..3 with d*sc."""
    nb = xb.shape[0]
    xs = _subblocks(xb, 16)
    scale, Ls = _make_q3_quants_rmse(xs, 4)
    scales = scale.view(nb, 16)
    Ls = Ls.T.reshape(nb, 16, 16)
    max_scale, _ = _first_absmax(scales, 1)
    nz = max_scale != 0
    iscale = _f32(-32.0) / max_scale
    l6 = ((_nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
    l6 = _where0(nz[:, None], l6.clamp(-32, 31) + 32)  # memset(scales, 0) when max_scale == 0
    d = _fp16(_where0(nz, _ONE / iscale))
    sc = l6 - 32
    dd = d.float()[:, None] * sc.float()
    Lq = (_nearest_int(xb.view(nb, 16, 16) / dd[..., None]).clamp(-4, 3) + 4).float()
    L = torch.where(dd[..., None] != 0, Lq, Ls)
    return {"d": d, "l6": l6, "L": L.reshape(nb, QK_K)}


def _dequant_q3_k(f):
    nb = f["d"].shape[0]
    dd = f["d"].float()[:, None] * (f["l6"] - 32).float()
    return (dd[..., None] * (f["L"].view(nb, 16, 16) - 4)).reshape(nb, QK_K)


def _quant_q2_k(xb):
    """quantize_row_q2_K_ref: 16 sub-blocks of 16, make_qkx2_quants(16, 3, weights=|x|, rmin=-0.5,
    rdelta=0.1, nstep=15, use_mad=true); 4-bit scales and mins against fp16 d = max_scale/15,
    dmin = max_min/15; weights requantized to 0..3."""
    nb = xb.shape[0]
    xs = _subblocks(xb, 16)
    scale, the_min, Ls = _make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales = scale.view(nb, 16)
    mins = the_min.view(nb, 16)
    Ls = Ls.T.reshape(nb, 16, 16)
    max_scale = _max_from_zero(scales)
    max_min = _max_from_zero(mins)
    has_s = max_scale > 0
    has_m = max_min > 0
    ls = _where0(has_s[:, None], _nearest_int((_f32(15.0) / max_scale)[:, None] * scales))
    lm = _where0(has_m[:, None], _nearest_int((_f32(15.0) / max_min)[:, None] * mins))
    byte = _to_u8(ls) | _to_u8(lm << 4)
    d = _fp16(_where0(has_s, max_scale / _f32(15.0)))
    dmin = _fp16(_where0(has_m, max_min / _f32(15.0)))
    dd = d.float()[:, None] * (byte & 0xF).float()
    dm = dmin.float()[:, None] * (byte >> 4).float()
    Lq = _nearest_int((xb.view(nb, 16, 16) + dm[..., None]) / dd[..., None]).clamp(0, 3).float()
    L = torch.where(dd[..., None] != 0, Lq, Ls)
    return {"d": d, "dmin": dmin, "sc": byte, "L": L.reshape(nb, QK_K)}


def _dequant_q2_k(f):
    nb = f["d"].shape[0]
    dd = f["d"].float()[:, None] * (f["sc"] & 0xF).float()
    dm = f["dmin"].float()[:, None] * (f["sc"] >> 4).float()
    return (dd[..., None] * f["L"].view(nb, 16, 16) - dm[..., None]).reshape(nb, QK_K)


# ---------------------------------------------------------------------------------------- with an imatrix
# ggml_quantize_chunk with importance (llama-quantize --imatrix): quantize_row_<type>_impl. Each takes blocks xb
# [nb, block], the importance of their columns qw [nb, block] and, for the 32-weight types, the sigma2 of the row
# each block belongs to ([nb]: sum of the row's x^2 / row length; those types weight by the whole row).

def _quant_q4_0_imatrix(xb, qw, row_sigma2):
    """make_qx_quants(32, 8, weights = qw*sqrt(sigma2 + x^2)); the search's levels are stored, no requantization."""
    xs, ws = xb.T.contiguous(), _importance_weights(xb, qw, row_sigma2).T.contiguous()
    d, L = _make_qx_quants_rmse1(xs, 8, ws)
    return {"d": _fp16(d), "L": L.T}


def _quant_q5_0_imatrix(xb, qw, row_sigma2):
    xs, ws = xb.T.contiguous(), _importance_weights(xb, qw, row_sigma2).T.contiguous()
    d, L = _make_qx_quants_rmse1(xs, 16, ws)
    return {"d": _fp16(d), "L": L.T}


def _quant_min_imatrix(xb, qw, row_sigma2, nmax):
    """Q4_1 / Q5_1: make_qkx3_quants(32, nmax, weights, rmin=-0.9, rdelta=0.05, nstep=36); d = fp16(scale),
    m = fp16(min)."""
    xs, ws = xb.T.contiguous(), _importance_weights(xb, qw, row_sigma2).T.contiguous()
    scale, the_min, L = _make_qkx2_quants(xs, ws, nmax, -0.9, 0.05, 36, use_mad=False)
    return {"d": _fp16(scale), "m": _fp16(-the_min), "L": L.T}


def _quant_q4_1_imatrix(xb, qw, row_sigma2):
    return _quant_min_imatrix(xb, qw, row_sigma2, 15)


def _quant_q5_1_imatrix(xb, qw, row_sigma2):
    return _quant_min_imatrix(xb, qw, row_sigma2, 31)


def _k_weights(xb, qw, n, factor):
    """Element-major sub-blocks of x and of weights qw*sqrt(sigma2 + x^2), sigma2 = factor*sum(x^2)/256 of the
    super-block, and each sub-block's sum of weights sw [nb*256/n]."""
    sigma2 = _row_sigma2(xb, QK_K, factor)
    ws = _subblocks(_importance_weights(xb, qw, sigma2), n)
    return _subblocks(xb, n), ws, _seqsum(ws)


def _unpack_k_scales(q):
    """get_scale_min_k4 for all 8 sub-blocks: the 6-bit (scale, min) that ggml reads from the 12 bytes."""
    q = q.to(torch.int64)
    ls = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    lm = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return ls, lm


def _quant_qk_min_imatrix(xb, qw, nmax, clamp63):
    """quantize_row_q{4,5}_K_impl: make_qkx3_quants(32, nmax, weights, -0.9, 0.05, 36) per sub-block; the 8 scales
    and 8 mins each as make_qp_quants(8, 63, ., sw) against fp16 d and dmin; the packed 6-bit scales are read back
    (get_scale_min_k4) to requantize every weight with (d*sc, dmin*m). Q5_K clamps the levels to 63 first."""
    nb = xb.shape[0]
    xs, ws, sw = _k_weights(xb, qw, 32, 2.0)
    scale, the_min, Ls = _make_qkx2_quants(xs, ws, nmax, -0.9, 0.05, 36, use_mad=False)
    swT = sw.view(nb, 8).T.contiguous()
    d_block, ls = _make_qp_quants(scale.view(nb, 8).T.contiguous(), 63, swT)
    m_block, lm = _make_qp_quants(the_min.view(nb, 8).T.contiguous(), 63, swT)
    ls, lm = ls.T.long(), lm.T.long()
    if clamp63:
        ls, lm = ls.clamp_max(63), lm.clamp_max(63)
    packed = torch.from_numpy(_pack_k_scales(ls, lm).astype(np.int64))
    ls, lm = _unpack_k_scales(packed)
    d, dmin = _fp16(d_block), _fp16(m_block)
    dd = d.float()[:, None] * ls.float()
    dm = dmin.float()[:, None] * lm.float()
    Lq = _nearest_int((xb.view(nb, 8, 32) + dm[..., None]) / dd[..., None]).clamp(0, nmax).float()
    L = torch.where(dd[..., None] != 0, Lq, Ls.T.reshape(nb, 8, 32))
    return {"d": d, "dmin": dmin, "ls": ls, "lm": lm, "packed_scales": packed, "L": L.reshape(nb, QK_K)}


def _quant_q4_k_imatrix(xb, qw, row_sigma2=None):
    return _quant_qk_min_imatrix(xb, qw, 15, clamp63=False)


def _quant_q5_k_imatrix(xb, qw, row_sigma2=None):
    return _quant_qk_min_imatrix(xb, qw, 31, clamp63=True)


def _quant_q6_k_imatrix(xb, qw, row_sigma2=None):
    return _quant_q6_k(xb, qw)


def _quant_q3_k_imatrix(xb, qw, row_sigma2=None):
    """quantize_row_q3_K_impl: make_qx_quants(16, 4, weights, rmse_type=1) per sub-block (sigma2 = 2*sum x^2/256),
    then the 16 scales as make_qx_quants(16, 32, scales, sw) (signed 6-bit levels against fp16 d); weights
    requantized to -4..3 with d*sc where that is non-zero."""
    nb = xb.shape[0]
    xs, ws, sw = _k_weights(xb, qw, 16, 2.0)
    scale, Ls = _make_qx_quants_rmse1(xs, 4, ws)
    d_block, l6 = _make_qx_quants_rmse1(scale.view(nb, 16).T.contiguous(), 32, sw.view(nb, 16).T.contiguous())
    l6 = l6.T.long()
    d = _fp16(d_block)
    dd = d.float()[:, None] * (l6 - 32).float()
    Lq = (_nearest_int(xb.view(nb, 16, 16) / dd[..., None]).clamp(-4, 3) + 4).float()
    L = torch.where(dd[..., None] != 0, Lq, Ls.T.reshape(nb, 16, 16))
    return {"d": d, "l6": l6, "L": L.reshape(nb, QK_K)}


def _quant_q2_k_imatrix(xb, qw, row_sigma2=None):
    """quantize_row_q2_K_impl: make_qkx3_quants(16, 3, weights, -0.9, 0.05, 36) per sub-block (sigma2 =
    sum x^2/256), scales and mins as make_qp_quants(16, 15, ., sw) against fp16 d, dmin; weights requantized to
    0..3 with (d*sc, dmin*m) where d*sc is non-zero."""
    nb = xb.shape[0]
    xs, ws, sw = _k_weights(xb, qw, 16, 1.0)
    scale, the_min, Ls = _make_qkx2_quants(xs, ws, 3, -0.9, 0.05, 36, use_mad=False)
    swT = sw.view(nb, 16).T.contiguous()
    dm, ls = _make_qp_quants(scale.view(nb, 16).T.contiguous(), 15, swT)
    mm, lm = _make_qp_quants(the_min.view(nb, 16).T.contiguous(), 15, swT)
    byte = _to_u8(ls.T.long() | (lm.T.long() << 4))
    d, dmin = _fp16(dm), _fp16(mm)
    dd = d.float()[:, None] * (byte & 0xF).float()
    dmn = dmin.float()[:, None] * (byte >> 4).float()
    Lq = _nearest_int((xb.view(nb, 16, 16) + dmn[..., None]) / dd[..., None]).clamp(0, 3).float()
    L = torch.where(dd[..., None] != 0, Lq, Ls.T.reshape(nb, 16, 16))
    return {"d": d, "dmin": dmin, "sc": byte, "L": L.reshape(nb, QK_K)}


# ------------------------------------------------------------------------------------------ IQ4_NL / IQ4_XS
# quantize_iq4_nl / quantize_iq4_xs (what ggml_quantize_chunk calls, with or without an imatrix; ntry = 7):
# weights x^2 without an imatrix, qw*sqrt(sigma2 + x^2) with one (sigma2 = 2*sum x^2/super-block length).

def _iq4_weights(xb, qw):
    if qw is None:
        return xb * xb
    return _importance_weights(xb, qw, _row_sigma2(xb, xb.shape[1], 2.0))


def _quant_iq4_nl(xb, qw=None, row_sigma2=None):
    """One scale per 32: the search's d stored as fp16; levels the nearest of d*kvalues with the float d."""
    d = _iq4_scales(xb.T.contiguous(), _iq4_weights(xb, qw).T.contiguous())
    L = _best_index_iq4(_safe_inv(d)[:, None] * xb)
    return {"d": _fp16(d), "L": L}


def _dequant_iq4_nl(f):
    return f["d"].float()[:, None] * _IQ4_VALUES[f["L"]]


def _quant_iq4_xs(xb, qw=None, row_sigma2=None):
    """Super-blocks of 256: 8 sub-block scales from the search, d = -max_scale/32 (max_scale: the first scale of
    largest |scale|; +0 if none is non-zero, so an all-zero block stores -0.0), 6-bit signed scale levels
    nearest_int(scale/d), levels the nearest of (d*l)*kvalues with the float d."""
    nb = xb.shape[0]
    xs = _subblocks(xb, 32)
    d_sub = _iq4_scales(xs, _subblocks(_iq4_weights(xb, qw), 32)).view(nb, 8)
    max_scale, amax = _first_absmax(d_sub, 1)
    max_scale = _where0(amax > 0, max_scale)
    d = -max_scale / _f32(32.0)
    l = _nearest_int(_safe_inv(d)[:, None] * d_sub).clamp(-32, 31)
    dl = d[:, None] * l.float()
    L = _best_index_iq4(_safe_inv(dl)[..., None] * xb.view(nb, 8, 32))
    return {"d": _fp16(d), "ls": l + 32, "L": L.reshape(nb, QK_K)}


def _dequant_iq4_xs(f):
    nb = f["d"].shape[0]
    dl = f["d"].float()[:, None] * (f["ls"] - 32).float()
    return (dl[..., None] * _IQ4_VALUES[f["L"]].view(nb, 8, 32)).reshape(nb, QK_K)


# ----------------------------------------------------------------------------------- IQ3_XXS / IQ3_S / IQ2_XS
# quantize_row_iq3_xxs_impl(256, ...) / quantize_row_iq3_s_impl(32, ...) / quantize_row_iq2_xs_impl (what
# ggml_quantize_chunk calls; an importance is optional for the IQ3s, required for IQ2_XS): per sub-block of 32 (16),
# signs stored apart and |x| matched to a grid of 256 / 512 / 512 points of 4 / 4 / 8 levels each (value 2l+1, l in
# 0..7 / 0..7 / 0..2; gguf.quants holds the same grids, in the order ggml indexes them). 31 / 19 / 19 trial scales; a
# group whose nearest levels are not a grid point takes the best of its listed neighbours (iq3xs_init_impl /
# iq2xs_init_impl: the points at the 2 / 3 / 2 smallest distances, in (distance, index) order); the best trial by
# sumqx^2/sumq2 is kept, off-grid groups are re-fitted at its least-squares scale, and the sub-block scales become
# 4-bit levels under one fp16 d per 256 (IQ3: d * 1.0125 / 1.033 stored, ggml's fudge factors). IQ3_XXS and IQ2_XS
# flip the sign of the least important weight of an 8-group with an odd count of negatives (7 sign bits stored, the
# 8th is their parity). Returned as the packed blocks; gguf.quants dequantizes them (ggml's dequantize_row_iq*).

_IQGRID = {
    "IQ3_XXS": dict(group=4, bits=3, kmax=8, sub=32, base=15.0, step=0.2, trials=range(-15, 16), nwant=2,
                    sigma=2.0, eps=1e-8, parity=True, refit_all=False, fudge=1.0125),
    "IQ3_S": dict(group=4, bits=3, kmax=8, sub=32, base=15.0, step=0.2, trials=range(-9, 10), nwant=3,
                  sigma=2.0, eps=0.0, parity=False, refit_all=True, fudge=1.033),
    "IQ2_XS": dict(group=8, bits=2, kmax=3, sub=16, base=5.0, step=0.1, trials=range(-9, 10), nwant=2,
                   sigma=1.0, eps=GROUP_MAX_EPS, parity=True, refit_all=False, fudge=1.0),
}


@lru_cache(maxsize=None)
def _iqgrid_tables(name: str):
    """(grid levels as the odd values 2l+1, float [G, n]; map from the code of n levels to the grid index or -1,
    long [C]; the off-grid codes' neighbour lists as ggml's init orders them, concatenated, long [P]; where each
    code's list starts in it and how long it is, long [C] each). n = 4 levels of 3 bits (C = 4096) or 8 of 2 (C =
    65536)."""
    p = _IQGRID[name]
    n, bits = p["group"], p["bits"]
    cls = getattr(gguf.quants, name)
    cls.init_grid()
    values = np.asarray(cls.grid).reshape(-1, n).astype(np.int64)
    levels = np.searchsorted(np.asarray(cls.grid_map), values)  # grid_map is ascending: value -> level
    shifts = bits * np.arange(n)
    ncodes = 1 << (bits * n)
    kmap = np.full(ncodes, -1, dtype=np.int64)
    kmap[(levels << shifts).sum(1)] = np.arange(len(levels))
    odd = 2 * levels + 1
    flat, count = [], np.zeros(ncodes, np.int64)
    for lo in range(0, ncodes, 4096):  # [4096, G] distances at a time
        codes = np.arange(lo, min(lo + 4096, ncodes))
        pos = 2 * ((codes[:, None] >> shifts) & ((1 << bits) - 1)) + 1
        d2 = ((odd[None] - pos[:, None]) ** 2).sum(-1)
        order = np.argsort(d2 * len(levels) + np.arange(len(levels)), axis=1, kind="stable")  # by (d2, index)
        sorted_d2 = np.take_along_axis(d2, order, 1)
        rank = np.concatenate([np.zeros((len(codes), 1), np.int64), np.cumsum(np.diff(sorted_d2, axis=1) > 0, 1)], 1)
        keep = (rank < p["nwant"]) & (kmap[codes] < 0)[:, None]
        count[codes] = keep.sum(1)
        flat.append(order[keep])
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return (torch.from_numpy(odd).float(), torch.from_numpy(kmap), torch.from_numpy(np.concatenate(flat)),
            torch.from_numpy(start), torch.from_numpy(count))


def _iqgrid_codes(L, name):
    """[..., n] levels -> the code l0 | l1 << b | l2 << 2b | ..."""
    p = _IQGRID[name]
    return (L << (p["bits"] * torch.arange(p["group"]))).sum(-1)


def _iqgrid_levels(xval, inv, name):
    """clamp(nearest_int(0.5*(inv*xval - 1)), 0, kMaxQ-1), long."""
    return _nearest_int(_f32(0.5) * (inv * xval - _ONE)).clamp(0, _IQGRID[name]["kmax"] - 1)


def _iqgrid_fit_groups(xval, waux, L, scale, name):
    """Snap every group of n levels (xval, waux, L [g, n]; scale [g]) to the grid: kept where the code is a grid
    point, else iq*_find_best_neighbour's choice (the first neighbour of least sum waux*(scale*q - x)^2). The lists
    are a few to a few dozen long, so the (group, neighbour) pairs are laid out flat. Returns (grid index [g], on
    the grid as given [g])."""
    grid, kmap, flat, start, count = _iqgrid_tables(name)
    code = _iqgrid_codes(L, name)
    index = kmap[code]
    off = torch.nonzero(index < 0).squeeze(1)
    if off.numel():
        c = count[code[off]]
        group = torch.repeat_interleave(torch.arange(off.numel()), c)  # the pair's group (of the off-grid ones)
        first = torch.cumsum(c, 0) - c  # each group's first pair
        pair = torch.arange(group.numel())
        cand = flat.index_select(0, start.index_select(0, code.index_select(0, off)).index_select(0, group)
                                 + pair - first.index_select(0, group))
        rows = off.index_select(0, group)
        diff = scale.index_select(0, rows)[:, None] * grid.index_select(0, cand) - xval.index_select(0, rows)
        term = (waux.index_select(0, rows) * diff) * diff
        d2 = term[:, 0]
        for i in range(1, term.shape[1]):
            d2 = d2 + term[:, i]
        least = torch.empty(off.numel()).scatter_reduce_(0, group, d2, "amin", include_self=False)
        at = torch.where(d2 == least.index_select(0, group), pair, group.numel())
        chosen = torch.empty(off.numel(), dtype=torch.long).scatter_reduce_(0, group, at, "amin", include_self=False)
        index = index.clone()
        index[off] = cand[chosen]
    return index, index == kmap[code]


def _iqgrid_sums(w, xval, index, name):
    """sumqx, sumq2 over each sub-block (q = the grid's 2l+1), accumulated in order as ggml does."""
    q = _iqgrid_tables(name)[0][index].view(-1, _IQGRID[name]["sub"])
    wt, xt, qt = w.T, xval.T, q.T
    return _seqsum((wt * xt) * qt), _seqsum((wt * qt) * qt)


def _quant_iqgrid(xb, qw, name):
    """The packed blocks [nb, bytes] of quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl /
    quantize_row_iq2_xs_impl for blocks xb [nb, 256]."""
    p = _IQGRID[name]
    sub, n = p["sub"], p["group"]
    per = sub // n  # groups per sub-block
    nb = xb.shape[0]
    weight = xb * xb if qw is None else _importance_weights(xb, qw, _row_sigma2(xb, QK_K, p["sigma"]))
    x, w = xb.reshape(-1, sub), weight.reshape(-1, sub)
    B = x.shape[0]
    waux = _sqrtf(w)
    neg = ~(x >= 0)
    xval = torch.where(neg, -x, x)
    bits = neg.view(B, sub // 8, 8).long()
    if p["parity"]:  # an even count of negatives per 8: flip the one of least weight*x*x (the first such)
        odd = bits.sum(-1) % 2 == 1
        imin = ((w * x) * x).view(B, sub // 8, 8).argmin(-1)
        flip = torch.nn.functional.one_hot(imin, 8).bool() & odd[..., None]
        xval = torch.where(flip.view(B, sub), -xval, xval)
        bits = bits ^ flip.long()
    signs = (bits << torch.arange(8)).sum(-1)  # [B, sub/8]
    if p["parity"]:
        signs = signs & 127
    mx = xval.amax(1)
    zero = mx < _f32(p["eps"]) if p["eps"] else mx == 0
    mx = torch.where(zero, _ONE, mx)
    xg, wg = xval.view(-1, n), waux.view(-1, n)
    best = torch.zeros(B)
    top = _f32(2 * p["kmax"] - 1)
    scale = mx / top
    L = torch.zeros(B * per, dtype=torch.long)  # grid index per group
    on_grid = torch.full((B * per,), not p["refit_all"])
    for t in p["trials"]:
        inv = ((top + _f32(float(t)) * _f32(p["step"])) / mx).repeat_interleave(per)  # per group
        index, got = _iqgrid_fit_groups(xg, wg, _iqgrid_levels(xg, inv[:, None], name), _ONE / inv, name)
        sumqx, sumq2 = _iqgrid_sums(w, xval, index, name)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = torch.where(take, sumqx / sumq2, scale)
        best = torch.where(take, scale * sumqx, best)
        take_g = take.repeat_interleave(per)
        L = torch.where(take_g, index, L)
        on_grid = torch.where(take_g, got, on_grid)
    refit = ((~on_grid).view(B, per).any(1) & (scale > 0)).repeat_interleave(per)
    redo = refit if p["refit_all"] else refit & ~on_grid  # IQ3_S re-fits every group, the others the off-grid ones
    if redo.any():
        inv = _ONE / torch.where(scale > 0, scale, _ONE)
        s_g = scale.repeat_interleave(per)
        index, _ = _iqgrid_fit_groups(xg[redo], wg[redo],
                                      _iqgrid_levels(xg[redo], inv.repeat_interleave(per)[redo][:, None], name),
                                      s_g[redo], name)
        L = L.clone()
        L[redo] = index
        sumqx, sumq2 = _iqgrid_sums(w, xval, L, name)
        scale = torch.where(refit.view(B, per)[:, 0] & (sumq2 > 0), sumqx / sumq2, scale)
    flipped = scale < 0
    signs = torch.where(flipped[:, None], ~signs & (127 if p["parity"] else 255), signs)
    scale = torch.where(flipped, -scale, scale)
    scale = _where0(~zero, scale)
    nsub = QK_K // sub
    L = torch.where(zero.repeat_interleave(per), 0, L).view(nb, nsub, per)
    signs = torch.where(zero[:, None], 0, signs).view(nb, nsub, sub // 8)
    scales = scale.view(nb, nsub)
    max_scale = scales.amax(1)
    d = max_scale / _f32(31.0)
    dh = _fp16(d * _f32(p["fudge"])) if p["fudge"] != 1.0 else _fp16(d)
    inv_d = _ONE / torch.where(max_scale > 0, d, _ONE)
    ls = _nearest_int(_f32(0.5) * (inv_d[:, None] * scales - _ONE)).clamp(0, 15)
    empty = (max_scale == 0).numpy()
    dh = torch.where(max_scale > 0, dh, torch.zeros((), dtype=torch.float16))
    L, signs, ls = L.numpy(), signs.numpy(), ls.numpy()
    if name == "IQ2_XS":  # qs[2*ib + k] = grid index | signs << 9 (uint16), then 4-bit scales, even ib low
        qs = (L | (signs << 9)).astype("<u2").view(np.uint8).reshape(nb, 64)
        out = np.concatenate([_fp16_bytes(dh), qs, _u8(ls[:, 0::2] | (ls[:, 1::2] << 4))], axis=1)
        out[empty] = 0
        return {"bytes": out}
    if name == "IQ3_XXS":
        sas = (signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (ls << 28))
        out = np.concatenate([_fp16_bytes(dh), _u8(L.reshape(nb, 64)),
                              sas.astype("<u4").view(np.uint8).reshape(nb, 32)], axis=1)
        out[empty] = 0
        return {"bytes": out}
    # IQ3_S: qh[ib] bit k = bit 8 of group k's index. ggml skips a sub-block whose max is 0 without advancing its
    # qs and signs pointers, so the later sub-blocks' indices and signs land that many places earlier.
    qh = ((L >> 8) << np.arange(8)).sum(-1)
    slot = np.cumsum(~zero.view(nb, 8).numpy(), 1) - 1  # where each written sub-block's data lands
    qs = np.zeros((nb, 8, 8), dtype=np.int64)
    sg = np.zeros((nb, 8, 4), dtype=np.int64)
    rows, subs = np.nonzero(~zero.view(nb, 8).numpy())
    qs[rows, slot[rows, subs]] = L[rows, subs] & 255
    sg[rows, slot[rows, subs]] = signs[rows, subs]
    scales_b = ls[:, 0::2] | (ls[:, 1::2] << 4)
    return {"bytes": np.concatenate([_fp16_bytes(dh), _u8(qs.reshape(nb, 64)), _u8(qh), _u8(sg.reshape(nb, 32)),
                                     _u8(scales_b)], axis=1)}


def _quant_iq3_xxs(xb, qw=None, row_sigma2=None):
    return _quant_iqgrid(xb, qw, "IQ3_XXS")


def _quant_iq3_s(xb, qw=None, row_sigma2=None):
    return _quant_iqgrid(xb, qw, "IQ3_S")


def _quant_iq2_xs(xb, qw=None, row_sigma2=None):
    return _quant_iqgrid(xb, qw, "IQ2_XS")


def _dequant_packed(name):
    qtype = gguf.GGMLQuantizationType[name]
    return lambda f: torch.from_numpy(gguf.quants.dequantize(f["bytes"], qtype)).view(f["bytes"].shape[0], -1)


# ------------------------------------------------------------------------------------------------- packing

def _u8(t) -> np.ndarray:
    return np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t).astype(np.uint8)


def _fp16_bytes(h: torch.Tensor) -> np.ndarray:
    return h.numpy().astype("<f2").view(np.uint8).reshape(-1, 2)


def _packed_levels(f) -> np.ndarray:
    return f["L"].numpy().astype(np.int32)


def _pack_nibbles(L):
    """qs[j] = L[j] | L[j+16] << 4 (the 32-weight types)."""
    return _u8((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4))


def _pack_qh32(L):
    """uint32 qh (little endian): bit k = bit 4 of L[k]."""
    bits = ((L >> 4) & 1).astype(np.uint8).reshape(-1, 4, 8)
    return _u8((bits << np.arange(8, dtype=np.uint8)).sum(-1))


def _pack_q8_0(f):
    return np.concatenate([_fp16_bytes(f["d"]), f["q"].numpy().astype(np.int8).view(np.uint8)], axis=1)


def _pack_q4_0(f):
    return np.concatenate([_fp16_bytes(f["d"]), _pack_nibbles(_packed_levels(f))], axis=1)


def _pack_q4_1(f):
    return np.concatenate([_fp16_bytes(f["d"]), _fp16_bytes(f["m"]), _pack_nibbles(_packed_levels(f))], axis=1)


def _pack_q5_0(f):
    L = _packed_levels(f)
    return np.concatenate([_fp16_bytes(f["d"]), _pack_qh32(L), _pack_nibbles(L)], axis=1)


def _pack_q5_1(f):
    L = _packed_levels(f)
    return np.concatenate([_fp16_bytes(f["d"]), _fp16_bytes(f["m"]), _pack_qh32(L), _pack_nibbles(L)], axis=1)


def _pack_k_scales(ls, lm):
    """The 12-byte 6-bit scale/min layout of Q4_K/Q5_K (get_scale_min_k4's inverse)."""
    ls = ls.numpy().astype(np.int32)
    lm = lm.numpy().astype(np.int32)
    out = np.zeros((ls.shape[0], 12), dtype=np.int32)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return _u8(out)


def _k_scales_bytes(f):
    return _u8(f["packed_scales"]) if "packed_scales" in f else _pack_k_scales(f["ls"], f["lm"])


def _pack_q4_k(f):
    L = _packed_levels(f).reshape(-1, 4, 2, 32)  # 64-weight chunks: low nibble first 32, high nibble next 32
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_fp16_bytes(f["d"]), _fp16_bytes(f["dmin"]), _k_scales_bytes(f), _u8(qs)], axis=1)


def _pack_q5_k(f):
    L = _packed_levels(f).reshape(-1, 4, 2, 32)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hi = (L >> 4) & 1  # [nb, chunk, half, 32]: bit 2*chunk + half of qh[l]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, :, :, None]
    qh = (hi << shifts).sum(axis=(1, 2))
    return np.concatenate([_fp16_bytes(f["d"]), _fp16_bytes(f["dmin"]), _k_scales_bytes(f), _u8(qh), _u8(qs)],
                          axis=1)


def _pack_q6_k(f):
    L = _packed_levels(f).reshape(-1, 2, 4, 32)  # two 128-weight halves of four 32-weight rows
    lo = L & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # [nb,2,64]
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [nb, 2, 32]
    sc = f["sc"].numpy().astype(np.int8).view(np.uint8)
    return np.concatenate([_u8(ql.reshape(-1, 128)), _u8(qh.reshape(-1, 64)), sc, _fp16_bytes(f["d"])], axis=1)


def _pack_2bit(L):
    """qs[32*c + l] = L[128c + l] | L[128c+l+32] << 2 | L[128c+l+64] << 4 | L[128c+l+96] << 6."""
    L = L.reshape(-1, 2, 4, 32)
    return _u8((L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64))


def _pack_q3_k(f):
    L = _packed_levels(f)
    high = (L > 3).astype(np.int32).reshape(-1, 8, 32)  # bit b of hmask[m] <- weight 32*b + m
    hmask = (high << np.arange(8)[None, :, None]).sum(1)
    l6 = f["l6"].numpy().astype(np.int32)
    scales = np.zeros((l6.shape[0], 12), dtype=np.int32)
    scales[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = (l6 >> 4).reshape(-1, 4, 4)  # j = 4*group + k -> byte 8 + k, bits 2*group
    scales[:, 8:12] = (hi << (2 * np.arange(4))[None, :, None]).sum(1)
    return np.concatenate([_u8(hmask), _pack_2bit(L & 3), _u8(scales), _fp16_bytes(f["d"])], axis=1)


def _pack_q2_k(f):
    return np.concatenate([_u8(f["sc"].numpy()), _pack_2bit(_packed_levels(f)), _fp16_bytes(f["d"]),
                           _fp16_bytes(f["dmin"])], axis=1)


def _pack_iq4_nl(f):
    return np.concatenate([_fp16_bytes(f["d"]), _pack_nibbles(_packed_levels(f))], axis=1)


def _pack_iq4_xs(f):
    ls = f["ls"].numpy().astype(np.int64)  # [nb, 8] in 0..63
    scales_h = ((ls >> 4) << (2 * np.arange(8))).sum(1).astype("<u2").view(np.uint8).reshape(-1, 2)
    scales_l = _u8((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4))
    qs = _pack_nibbles(_packed_levels(f).reshape(-1, 32)).reshape(-1, 128)
    return np.concatenate([_fp16_bytes(f["d"]), scales_h, scales_l, qs], axis=1)


_IMPL = {
    "Q8_0": (_quant_q8_0, _dequant_q8_0, _pack_q8_0),
    "Q4_0": (_quant_q4_0, _dequant_q4_0, _pack_q4_0),
    "Q4_1": (_quant_q4_1, _dequant_q4_1, _pack_q4_1),
    "Q5_0": (_quant_q5_0, _dequant_q5_0, _pack_q5_0),
    "Q5_1": (_quant_q5_1, _dequant_q5_1, _pack_q5_1),
    "Q6_K": (_quant_q6_k, _dequant_q6_k, _pack_q6_k),
    "Q5_K": (_quant_q5_k, _dequant_qk_min, _pack_q5_k),
    "Q4_K": (_quant_q4_k, _dequant_qk_min, _pack_q4_k),
    "Q3_K": (_quant_q3_k, _dequant_q3_k, _pack_q3_k),
    "Q2_K": (_quant_q2_k, _dequant_q2_k, _pack_q2_k),
    "IQ4_NL": (_quant_iq4_nl, _dequant_iq4_nl, _pack_iq4_nl),
    "IQ4_XS": (_quant_iq4_xs, _dequant_iq4_xs, _pack_iq4_xs),
    "IQ3_XXS": (_quant_iq3_xxs, _dequant_packed("IQ3_XXS"), lambda f: f["bytes"]),
    "IQ3_S": (_quant_iq3_s, _dequant_packed("IQ3_S"), lambda f: f["bytes"]),
    "IQ2_XS": (_quant_iq2_xs, _dequant_packed("IQ2_XS"), lambda f: f["bytes"]),
}
# with an imatrix: fn(xb, qw, row_sigma2). Q8_0 ignores the importance (quantize_q8_0 never reads it).
_IMPL_IMATRIX = {
    "Q4_0": _quant_q4_0_imatrix, "Q5_0": _quant_q5_0_imatrix, "Q4_1": _quant_q4_1_imatrix,
    "Q5_1": _quant_q5_1_imatrix, "Q6_K": _quant_q6_k_imatrix, "Q5_K": _quant_q5_k_imatrix,
    "Q4_K": _quant_q4_k_imatrix, "Q3_K": _quant_q3_k_imatrix, "Q2_K": _quant_q2_k_imatrix,
    "IQ4_NL": _quant_iq4_nl, "IQ4_XS": _quant_iq4_xs, "IQ3_XXS": _quant_iq3_xxs, "IQ3_S": _quant_iq3_s,
    "IQ2_XS": _quant_iq2_xs,
}


# ------------------------------------------------------------------------------------------------- public

def round_activations(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """x [..., cols] as ggml's CPU backend rounds a matrix product's input for weights of `type_name` (VEC_DOT_TYPE),
    the values its dot products see, in x's dtype. On x86-64: Q8_0 / Q8_1 (quantize_row_q8_0/q8_1's AVX path) per 32
    values, q = round-half-even(x * 127 / max|x|), times the fp16 of max|x| / 127; Q8_K (quantize_row_q8_K_ref) per
    256, q = min(127, nearest_int(x * -127 / m)), m the first value of largest |x|, times the float32 1 / (-127 / m);
    F16 / BF16 the nearest such value. (The Q8_1 block's sum only regroups the same product.)"""
    kind = VEC_DOT_TYPE[_canonical(type_name)]
    if kind == "F32":
        return x
    if kind in ("F16", "BF16"):
        return x.to(torch.float16 if kind == "F16" else torch.bfloat16).to(x.dtype)
    n = 32 if kind in ("Q8_0", "Q8_1") else QK_K
    xb = x.float().reshape(-1, n)
    if n == 32:
        amax = xb.abs().amax(1)
        inv = _where0(amax != 0, _f32(127.0) / amax)
        out = torch.round(xb * inv[:, None]) * _fp16(amax / _f32(127.0)).float()[:, None]
    else:
        m, amax = _first_absmax(xb, 1)
        iscale = _where0(amax != 0, _f32(-127.0) / m)
        d = _where0(amax != 0, _ONE / iscale)
        out = torch.round(xb * iscale[:, None]).clamp_(max=127) * d[:, None]
    return out.reshape(x.shape).to(x.dtype)


def uses_importance(type_name: str) -> bool:
    """Whether an importance matrix changes how llama-quantize rounds the type (not for Q8_0 and the float types,
    whose quantize_* never read it)."""
    return _canonical(type_name) in _IMPL_IMATRIX


def _prepare(weight, type_name, importance=None):
    name = _canonical(type_name)
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight)
    check_shape(weight.shape, name)
    # llama-quantize converts F16/BF16 sources to F32 first (exact), then quantizes the F32 rows
    x = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if importance is None and name in NEEDS_IMPORTANCE:
        raise EWQError(f"{name} is rounded only with an importance matrix (ggml asserts one); drop --no-imatrix, "
                       f"or {name} from --formats")
    if importance is None or name not in _IMPL_IMATRIX:
        return name, x, None
    qw = torch.as_tensor(importance).detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
    if qw.numel() != x.shape[1]:
        raise EWQError(f"the importance has {qw.numel()} values; the matrix has {x.shape[1]} columns "
                       f"(one importance per input column)")
    return name, x, qw


def _chunks(x, name, qw=None):
    """Yield (blocks [nb, block], their importance [nb, block] or None, their row's sigma2 [nb] or None), a chunk of
    weights at a time. With importance the chunks are whole rows (the 32-weight types weight by the whole row)."""
    block = TYPES[name].block_size
    budget = _CHUNK_WEIGHTS_BY_TYPE.get(name, _CHUNK_WEIGHTS)
    if qw is None:
        blocks = x.reshape(-1, block)
        step = max(1, budget // block)
        for start in range(0, blocks.shape[0], step):
            yield blocks[start:start + step], None, None
        return
    rows, cols = x.shape
    per_row = cols // block
    step = max(1, _CHUNK_WEIGHTS_IMATRIX.get(name, budget) // cols)
    qw_blocks = qw.view(per_row, block)
    for start in range(0, rows, step):
        xr = x[start:start + step]
        n = xr.shape[0]
        sigma2 = _row_sigma2(xr, cols).repeat_interleave(per_row) if block == 32 else None
        yield xr.reshape(-1, block), qw_blocks.repeat(n, 1), sigma2


def _quantized_blocks(x, name, qw):
    """The stored fields of every chunk (a generator): the imatrix path where importance is given."""
    quant = _IMPL_IMATRIX[name] if qw is not None else _IMPL[name][0]
    for xb, qwb, sigma2 in _chunks(x, name, qw):
        yield quant(xb, qwb, sigma2) if qw is not None else quant(xb)


# ----------------------------------------------------------- grids, for rounding with error feedback (ewq.gptq)
# The field holding each weight's level, and the levels' range, of the types whose values, once the block's scales
# are fixed, are one of a few per weight (IQ3/IQ2's lattice codebooks pick 4-8 weights at a time: not here).
GRID_LEVELS = {"Q8_0": ("q", -127, 127), "Q4_0": ("L", 0, 15), "Q5_0": ("L", 0, 31), "Q4_1": ("L", 0, 15),
               "Q5_1": ("L", 0, 31), "Q6_K": ("L", 0, 63), "Q5_K": ("L", 0, 31), "Q4_K": ("L", 0, 15),
               "Q3_K": ("L", 0, 7), "Q2_K": ("L", 0, 3), "IQ4_NL": ("L", 0, 15), "IQ4_XS": ("L", 0, 15)}


def row_sigma2(weight: torch.Tensor) -> torch.Tensor:
    """The mean x^2 of each row [rows], as the 32-weight types' importance paths weight their blocks by it."""
    return _row_sigma2(weight.to(torch.float32).contiguous(), weight.shape[1])


# The types whose values are affine in the level (scale x level + offset, per weight): the nearest level is a
# division away; the others (IQ4_NL / IQ4_XS: 16 non-linear values) are searched over every level.
AFFINE_GRID = frozenset(GRID_LEVELS) - {"IQ4_NL", "IQ4_XS"}


def block_grid(blocks: torch.Tensor, type_name: str, importance=None, row_sigma2=None) -> tuple[dict, torch.Tensor]:
    """For blocks [nb, block] of one column range (float32), the scales llama-quantize's search picks for them (with
    the importance [nb, block] and, for the 32-weight types, each block's row_sigma2 [nb], as quantize_row_*_impl;
    without, as the _ref path), and the values each weight can take under those scales: (the stored fields, grid).
    grid: [levels, nb, block], every level's value; for AFFINE_GRID types only the first two levels' (the rest
    follow: value(k) = grid[0] + k * (grid[1] - grid[0]), to a rounding). level_values gives the values of a choice
    exactly, pack_levels the blocks' bytes."""
    name = _canonical(type_name)
    key, lo, hi = GRID_LEVELS[name]
    with torch.no_grad():
        if importance is not None and name in _IMPL_IMATRIX:
            fields = _IMPL_IMATRIX[name](blocks, importance, row_sigma2)
        else:
            fields = _IMPL[name][0](blocks)
        dequant = _IMPL[name][1]
        top = lo + 1 if name in AFFINE_GRID else hi
        grid = torch.stack([dequant({**fields, key: torch.full_like(fields[key], k)}).reshape(blocks.shape)
                            for k in range(lo, top + 1)])
    return fields, grid


def _with_levels(fields: dict, name: str, levels: torch.Tensor) -> dict:
    """block_grid's fields with each weight's level replaced by `levels` (indices from 0 into its grid)."""
    key, lo, _ = GRID_LEVELS[name]
    return {**fields, key: (levels + lo).to(fields[key].dtype).reshape(fields[key].shape)}


def level_values(fields: dict, type_name: str, levels: torch.Tensor) -> torch.Tensor:
    """The values ggml reads back from blocks with these scales and levels (indices from 0, as pack_levels)."""
    name = _canonical(type_name)
    with torch.no_grad():
        return _IMPL[name][1](_with_levels(fields, name, levels)).reshape(levels.shape)


def pack_levels(fields: dict, type_name: str, levels: torch.Tensor) -> np.ndarray:
    """ggml's bytes [nb, bytes per block] of blocks with block_grid's scales `fields` and, per weight, the index of
    its value in block_grid's grid (levels [nb, block], int)."""
    name = _canonical(type_name)
    return _IMPL[name][2](_with_levels(fields, name, levels))


@contextmanager
def torch_threads(n):
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize_dequantize(weight: torch.Tensor, type_name: str, *, importance=None,
                        threads: int | None = 1) -> torch.Tensor:
    """The weight [rows, cols] after one round trip through the ggml type, as llama-quantize writes it and ggml's
    dequantize_row_* reads it back. float32, same shape, on the CPU. F32/F16/BF16 are plain round-to-nearest-even
    casts.

    importance: None (llama-quantize without --imatrix) or the importance of each input column, float [cols] (what
    llama-quantize --imatrix passes for the tensor: the mean of the squared inputs, ewq.imatrix); Q8_0 and the float
    types ignore it, as ggml does.
    threads: torch intra-op threads during the call (restored afterwards; None leaves the setting alone). The
    k-quant searches are thousands of small tensor ops; on a busy machine each op with 2+ threads waits for a
    free core, measured 10-100x slower than 1 thread on the shared 2-core box."""
    name, x, qw = _prepare(weight, type_name, importance)
    if name == "F32":
        return x.clone()
    if name in ("F16", "BF16"):
        return x.to(torch.float16 if name == "F16" else torch.bfloat16).to(torch.float32)
    lib = ggml_native.library()
    if lib is not None:  # ggml's own C, where the llama.cpp this emulates is installed: the same bytes, faster
        packed = lib.quantize(x.numpy(), name, None if qw is None else qw.numpy())
        return torch.from_numpy(lib.dequantize(packed, name, tuple(x.shape)))
    dequant = _IMPL[name][1]
    with torch.no_grad(), torch_threads(threads):
        out = torch.cat([dequant(f).reshape(-1) for f in _quantized_blocks(x, name, qw)])
    return out.view(x.shape)


def quantize_to_bytes(weight: torch.Tensor, type_name: str, *, importance=None,
                      threads: int | None = 1) -> np.ndarray:
    """ggml's packed blocks for the weight: uint8 [rows, cols/block*bytes_per_block], byte for byte what
    ggml_quantize_chunk writes (with the importance, if given: as in quantize_dequantize); the layout
    gguf.quants.quantize returns and a GGUF writer stores (gguf.quants.dequantize reads it back)."""
    name, x, qw = _prepare(weight, type_name, importance)
    rows = x.shape[0]
    if name == "F32":
        return x.numpy().astype("<f4").view(np.uint8).reshape(rows, -1)
    if name == "F16":
        return x.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(rows, -1)
    if name == "BF16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").view(np.uint8).reshape(rows, -1)
    lib = ggml_native.library()
    if lib is not None:
        return lib.quantize(x.numpy(), name, None if qw is None else qw.numpy())
    pack = _IMPL[name][2]
    with torch.no_grad(), torch_threads(threads):
        packed = np.concatenate([pack(f) for f in _quantized_blocks(x, name, qw)])
    return packed.reshape(rows, -1)
