"""ewq.ggml_quants against gguf-py, against golden ggml output, and against the formats' error bounds.

No llama.cpp needed: the golden hashes below are of the blocks ggml's own ggml_quantize_chunk (llama.cpp vendored
in llama-cpp-python 0.3.36, x86-64) wrote for the deterministic matrices built here; bench/check_ggml_quants.py
re-derives that comparison against a built llama.cpp.
"""

import hashlib
import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ewq import ggml_quants as G
from ewq.common import EWQError

GGUF_QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16")
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")

# sha256[:16] of ggml_quantize_chunk(type, det_matrix(64, 4096, coarse), imatrix=NULL). 1024 super-blocks: big
# enough that a one-ulp slip (torch.sqrt instead of a correctly rounded sqrtf, torch.sum instead of ggml's
# sequential sums) changes some Q4_K/Q5_K scale and so the hash.
GOLDEN = {
    False: {"Q8_0": "27922422a3790327", "Q6_K": "944ba89ba80d0a31", "Q5_K": "5fe3f266f1939086",
            "Q4_K": "47ceea10901bcef4", "Q4_0": "dbb71cd61c3bc89d", "Q5_0": "6e823f74347b4edd",
            "Q4_1": "88257073b5ba15a4", "Q5_1": "e5bebd32aac2583e", "Q3_K": "cc8e1de805b8b888",
            "Q2_K": "92e39830ab150c2e", "IQ4_NL": "03d990889c40df99", "IQ4_XS": "7033c02f4f38772a",
            "IQ3_XXS": "7743b8b8ad2bf28b", "IQ3_S": "c620fd83f9c02e09"},
    True: {"Q8_0": "48ec5ea7bae2ea8a", "Q6_K": "d66327187a7c008f", "Q5_K": "95f2fbcce35a4167",
           "Q4_K": "dc4ce3af29eb0fa1", "Q4_0": "f70f9ea609f5bb75", "Q5_0": "1076b6340072ceed",
           "Q4_1": "a637d41a6411a90e", "Q5_1": "f9cafe2e42d127c6", "Q3_K": "f7c21118666769a7",
           "Q2_K": "66b9db4cc04d0fba", "IQ4_NL": "660a8c33f76a3b95", "IQ4_XS": "567375b347e09e45",
           "IQ3_XXS": "1e2ff78cfefa0542", "IQ3_S": "20ff61e355e9d367"},
}
# sha256[:16] of ggml_quantize_chunk(type, det_matrix(32, 4096), imatrix=det_importance(4096)): llama-quantize
# --imatrix's rounding (quantize_row_*_impl), same ggml build
GOLDEN_IMATRIX = {
    "Q8_0": "47374645e7e8ef52", "Q6_K": "ce37d4966d65ea64", "Q5_K": "1369815ca13e6daa", "Q4_K": "cf4d729f1aed9614",
    "Q4_0": "545e3e70f059184c", "Q5_0": "5c0ae5028cc36a0f", "Q4_1": "20b88ec765436142", "Q5_1": "f875d48f3f9148e6",
    "Q3_K": "3f86cfdf02f6bb6b", "Q2_K": "71d2b442e5f65708", "IQ4_NL": "9b03ca07af871904", "IQ4_XS": "e85c0cc98c313352",
    "IQ3_XXS": "56a8c3daeff538d9", "IQ3_S": "de2e22f2854b5ce7", "IQ2_XS": "2b4976b925780c34",
}
# ggml rounds these only with an importance (quantize_row_iq2_xs_impl asserts one): no plain golden
PLAIN = tuple(n for n in G.EMULATED_TYPES if n not in G.NEEDS_IMPORTANCE)
# the 3-bit i-quants on det_matrix(8, 1024) with all-zero sub-blocks of 32 (one in every row, a whole super-block,
# a row's last): IQ3_S skips such a sub-block without advancing its write pointers, which the emulation repeats
GOLDEN_HOLES = {"IQ3_XXS": "785fb03034f4fcf7", "IQ3_S": "98161aee60338ddd"}
# IQ2_XS on the same matrix, with det_importance(1024)
GOLDEN_HOLES_IMATRIX = {"IQ2_XS": "9780f0e493a0af1b"}


def det_matrix(rows, cols, coarse=False):
    """Deterministic, platform-independent float32 weights: an integer hash -> sum of 4 uniforms (roughly
    Gaussian), exact multiples of 2^-22, rows scaled by powers of two, a few outliers. `coarse` rounds to a
    coarser grid so many values land exactly on rounding ties."""
    i = np.arange(rows * cols, dtype=np.uint64)
    acc = np.zeros(rows * cols, dtype=np.int64)
    for k in range(4):
        h = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0xD1B54A32D192ED03 * (k + 1) & 0xFFFFFFFFFFFFFFFF)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
        acc += (h >> np.uint64(48)).astype(np.int64) - 32768
    if coarse:
        acc = (acc // 512) * 512
    acc[::97] *= 6
    x = acc.astype(np.float32) * np.float32(2.0 ** -22)
    x = x.reshape(rows, cols) * (np.float32(2.0) ** (np.arange(rows) % 5 - 2)).astype(np.float32)[:, None]
    return torch.from_numpy(x.astype(np.float32))


def det_importance(cols):
    """Deterministic per-column importance with a 64x spread, outlier columns and one dead (0) column."""
    i = np.arange(cols, dtype=np.float64)
    v = (np.exp(np.sin(i * 0.37) * 3.0) * 2.0 ** -8).astype(np.float32)
    v[::53] *= 64
    v[7] = 0.0
    return v


def gauss(rows, cols, seed=0, scale=0.02):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def bits(t):
    return np.asarray(t, dtype=np.float32).view(np.uint32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the searches are many small ops: one thread is faster, and steadier on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- type table

def test_type_table_bits_per_weight():
    expected = {"Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "Q4_0": 4.5, "Q5_0": 5.5, "Q4_1": 5.0,
                "Q5_1": 6.0, "Q3_K": 3.4375, "Q2_K": 2.625, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "IQ3_XXS": 3.0625,
                "IQ3_S": 3.4375, "IQ2_XS": 2.3125, "F16": 16.0, "BF16": 16.0, "F32": 32.0}
    assert {k: v.bits_per_weight for k, v in G.TYPES.items()} == expected
    assert G.TYPES["Q6_K"] == G.TypeInfo(256, 210, 6.5625)
    assert G.TYPES["Q8_0"] == G.TypeInfo(32, 34, 8.5)


def test_plans_name_every_emulated_type():
    from ewq.backends.llamacpp import ACCEPTS, BUILTIN_DECODE_COST, TORCH_MENU_AS, decode_cost_table
    from ewq.gguf_export import TYPES as WRITABLE
    from ewq.plan import PRECISIONS

    # every type a plan may name is rounded here (plainly, and with importance where ggml uses it), written by the
    # exporter, accepted by the llama.cpp backend and timed by the decode-cost table
    assert set(G.EMULATED_TYPES) <= set(PRECISIONS) and set(G.EMULATED_TYPES) <= set(WRITABLE)
    assert set(G.EMULATED_TYPES) == set(ACCEPTS) - set(TORCH_MENU_AS) == set(G._IMPL)
    assert set(G._IMPL_IMATRIX) == set(G.EMULATED_TYPES) - {"Q8_0"}
    for _, table, _ in BUILTIN_DECODE_COST.values():  # every format a plan may hold is timed, on either CPU family
        assert set(G.EMULATED_TYPES) | {"F16", "BF16"} <= set(table)
    # the AVX-512 + AMX table is the measurement on record, as --decode-cost would read it
    measured = decode_cost_table(Path(__file__).parents[1] / "docs/results/decode_cost/decode_cost_xeon_avx512.json")
    assert BUILTIN_DECODE_COST["avx512_amx"][1] == measured["table"]


def test_shape_rules_and_llama_quantize_fallback():
    assert G.can_quantize((576, 1536), "Q4_K")
    assert not G.can_quantize((1536, 576), "Q4_K")  # 576 = 2.25 * 256
    assert G.can_quantize((1536, 576), "q8_0")
    assert G.llama_quantize_fallback("Q4_K", 576) == "Q5_0"
    assert G.llama_quantize_fallback("Q5_K", 576) == "Q5_1"
    assert G.llama_quantize_fallback("Q6_K", 576) == "Q8_0"
    assert G.llama_quantize_fallback("Q3_K", 576) == "Q4_0"
    assert G.llama_quantize_fallback("Q2_K", 576) == "Q4_0"
    assert G.llama_quantize_fallback("IQ4_XS", 576) == "IQ4_NL"
    assert G.llama_quantize_fallback("IQ3_XXS", 576) == G.llama_quantize_fallback("IQ3_S", 576) == "IQ4_NL"
    assert G.llama_quantize_fallback("Q4_K", 4096) == "Q4_K"
    assert G.llama_quantize_fallback("Q4_K", 100) == "F16"
    assert G.llama_quantize_fallback("Q8_0", 100) == "F16"


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q2_K"])
def test_refuses_rows_the_type_cannot_take(name):
    w = gauss(8, 576)
    with pytest.raises(EWQError, match=r"multiple of 256.*fall back to Q"):
        G.quantize_dequantize(w, name)
    with pytest.raises(EWQError, match="multiple of 256"):
        G.quantize_to_bytes(w, name)


def test_refuses_bad_input():
    with pytest.raises(EWQError, match="multiple of 32"):
        G.quantize_dequantize(gauss(4, 48), "Q8_0")
    with pytest.raises(EWQError, match="2-D"):
        G.quantize_dequantize(torch.zeros(256), "Q4_K")
    with pytest.raises(EWQError, match="2-D"):
        G.quantize_dequantize(torch.zeros(2, 2, 256), "Q4_K")
    with pytest.raises(EWQError, match="unknown ggml type"):
        G.quantize_dequantize(gauss(4, 256), "Q4_K_M")


# ------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("name", PLAIN)
def test_bytes_match_ggml_golden(name, coarse):
    packed = G.quantize_to_bytes(det_matrix(64, 4096, coarse), name)
    info = G.TYPES[name]
    assert packed.dtype == np.uint8 and packed.shape == (64, 4096 // info.block_size * info.bytes_per_block)
    assert hashlib.sha256(packed.tobytes()).hexdigest()[:16] == GOLDEN[coarse][name]


@pytest.mark.parametrize("name", G.EMULATED_TYPES)
def test_bytes_with_importance_match_ggml_golden(name):
    packed = G.quantize_to_bytes(det_matrix(32, 4096), name, importance=det_importance(4096))
    assert hashlib.sha256(packed.tobytes()).hexdigest()[:16] == GOLDEN_IMATRIX[name]


@pytest.mark.parametrize("name", sorted(GOLDEN_HOLES) + sorted(GOLDEN_HOLES_IMATRIX))
def test_iq_zero_sub_blocks_match_ggml_golden(name):
    w = det_matrix(8, 1024).clone()
    w[:, 64:96] = 0
    w[2, 256:512] = 0
    w[5, 992:] = 0
    imp = det_importance(1024) if name in GOLDEN_HOLES_IMATRIX else None
    packed = G.quantize_to_bytes(w, name, importance=imp)
    assert hashlib.sha256(packed.tobytes()).hexdigest()[:16] == {**GOLDEN_HOLES, **GOLDEN_HOLES_IMATRIX}[name]
    np.testing.assert_array_equal(G.quantize_dequantize(w, name, importance=imp)[2, 256:512].numpy(), 0)


def _found_library():
    from ewq import ggml_native

    for path in ggml_native.candidates():
        if path.is_file():
            return ggml_native.GgmlLibrary(path)
    return None


@pytest.mark.skipif(_found_library() is None, reason="no llama.cpp 0.3.36 build (llama-cpp-python or bench's tools)")
def test_ggml_own_quantizer_where_installed_gives_the_same_bytes(monkeypatch):
    """Where the llama.cpp EWQ emulates is installed, its C rounds instead (ewq.ggml_native): the golden bytes, and
    the same round trip as the emulation, for every type, with and without importance."""
    from ewq import ggml_native

    lib = _found_library()
    emulated = {name: G.quantize_dequantize(det_matrix(8, 1024), name, importance=det_importance(1024))
                for name in G.EMULATED_TYPES}
    monkeypatch.setattr(ggml_native, "library", lambda: lib)
    for name in PLAIN:
        for coarse in (False, True):
            packed = G.quantize_to_bytes(det_matrix(64, 4096, coarse), name)
            assert hashlib.sha256(packed.tobytes()).hexdigest()[:16] == GOLDEN[coarse][name], name
    for name in G.EMULATED_TYPES:
        packed = G.quantize_to_bytes(det_matrix(32, 4096), name, importance=det_importance(4096))
        assert hashlib.sha256(packed.tobytes()).hexdigest()[:16] == GOLDEN_IMATRIX[name], name
        native = G.quantize_dequantize(det_matrix(8, 1024), name, importance=det_importance(1024))
        assert torch.equal(native, emulated[name]), name
    with pytest.raises(EWQError, match="IQ2_XS is rounded only with an importance matrix"):
        G.quantize_dequantize(gauss(4, 256), "IQ2_XS")  # refused before ggml would assert (and abort the process)


def test_ggml_library_choice(monkeypatch, tmp_path):
    from ewq import ggml_native

    for setting, want in (("off", None), (str(tmp_path / "nothing.so"), "EWQ_GGML_LIB=")):
        monkeypatch.setenv("EWQ_GGML_LIB", setting)
        ggml_native.library.cache_clear()
        try:
            if want is None:
                assert ggml_native.library() is None and "emulation" in ggml_native.describe()
            else:
                with pytest.raises(EWQError, match=want):
                    ggml_native.library()
        finally:
            ggml_native.library.cache_clear()
    # a llama-cpp-python of another version vendors another ggml, which may round otherwise: never taken
    monkeypatch.setattr(ggml_native.importlib.metadata, "version", lambda dist: "0.3.99")
    assert not any("llama_cpp" in str(p) for p in ggml_native.candidates())


def test_types_rounded_only_with_importance_refuse_without():
    assert G.NEEDS_IMPORTANCE == ("IQ2_XS",)
    with pytest.raises(EWQError, match="IQ2_XS is rounded only with an importance matrix"):
        G.quantize_dequantize(gauss(4, 256), "IQ2_XS")


def test_importance_changes_rounding_where_ggml_reads_it():
    w = gauss(16, 512, seed=4)
    imp = torch.from_numpy(det_importance(512))
    for name in PLAIN:
        plain, weighted = G.quantize_dequantize(w, name), G.quantize_dequantize(w, name, importance=imp)
        assert torch.equal(plain, weighted) == (not G.uses_importance(name)), name  # Q8_0 ignores it
        err = lambda q: float((((q - w) ** 2) * imp).sum())  # noqa: E731 -- the error the importance weights
        if G.uses_importance(name):
            assert err(weighted) < err(plain), name
    with pytest.raises(EWQError, match="importance has 256 values; the matrix has 512 columns"):
        G.quantize_dequantize(w, "Q4_K", importance=torch.ones(256))


def _special_rows(cols):
    g = torch.Generator().manual_seed(3)
    rows = [torch.zeros(cols), torch.full((cols,), 0.37), torch.full((cols,), -1.5),
            torch.randn(cols, generator=g) * 1e-6, torch.randn(cols, generator=g) * 3e3,
            torch.randint(-8, 8, (cols,), generator=g).float(),
            (torch.randn(cols, generator=g) * 0.02).half().float(),
            torch.rand(cols, generator=g), -torch.rand(cols, generator=g) - 1]
    r = torch.zeros(cols)
    r[5] = 1.0
    rows.append(r)
    r = torch.randn(cols, generator=g)
    r[r.abs() < 1.5] = 0
    rows.append(r)
    return torch.stack(rows)


@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (64, 512), (33, 1024)])
def test_equals_gguf_round_trip(name, shape):
    w = gauss(*shape, seed=shape[0])
    if shape == (33, 1024):
        w[:11] = _special_rows(1024)
    qtype = gguf.GGMLQuantizationType[name]
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype).astype(np.float32)
    mine = G.quantize_dequantize(w, name)
    assert mine.dtype == torch.float32 and mine.shape == w.shape
    np.testing.assert_array_equal(bits(mine), bits(ref))
    packed = G.quantize_to_bytes(w, name)
    np.testing.assert_array_equal(packed, gguf.quants.quantize(w.numpy(), qtype).view(np.uint8).reshape(packed.shape))


@pytest.mark.parametrize("name", G.EMULATED_TYPES)
def test_bytes_read_back_by_gguf_equal_round_trip(name):
    w = torch.cat([gauss(21, 512, seed=1), _special_rows(512)])
    imp = det_importance(512) if name in G.NEEDS_IMPORTANCE else None
    packed = G.quantize_to_bytes(w, name, importance=imp)
    back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name]).astype(np.float32)
    np.testing.assert_array_equal(bits(back), bits(G.quantize_dequantize(w, name, importance=imp)))


def test_accepts_fp16_and_returns_float32_on_cpu():
    w = gauss(4, 256).half()
    out = G.quantize_dequantize(w, "Q4_K")
    assert out.dtype == torch.float32 and out.shape == (4, 256)
    assert torch.equal(out, G.quantize_dequantize(w.float(), "Q4_K"))


# ------------------------------------------------------------------------------------------ error bounds

def test_relative_rms_error_ordering_and_size():
    w = gauss(64, 1024, seed=2)
    flat = torch.ones(1024)  # a uniform importance where ggml needs one
    rel = {n: ((w - G.quantize_dequantize(w, n, importance=flat if n in G.NEEDS_IMPORTANCE else None)).norm()
               / w.norm()).item() for n in G.EMULATED_TYPES}
    chain = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    assert all(rel[a] < rel[b] for a, b in itertools.pairwise(chain)), rel
    assert rel["Q5_K"] < rel["Q5_1"] < rel["Q5_0"] < rel["Q4_K"] < rel["Q4_1"] < rel["Q4_0"] < rel["Q3_K"], rel
    assert rel["Q3_K"] < rel["IQ3_S"] < rel["IQ3_XXS"] < rel["Q2_K"] < rel["IQ2_XS"], rel  # 3.44 3.44 3.06 2.63 2.31
    # Gaussian data, ~2.2 sigma block max: the step / sqrt(12) rule of thumb, with margin both ways
    expected = {"Q8_0": 0.0053, "Q6_K": 0.0177, "Q5_K": 0.036, "Q5_1": 0.038, "Q5_0": 0.043, "Q4_K": 0.072,
                "Q4_1": 0.078, "Q4_0": 0.086, "Q3_K": 0.15, "Q2_K": 0.30, "IQ3_S": 0.165, "IQ3_XXS": 0.21}
    for n, e in expected.items():
        assert 0.8 * e < rel[n] < 1.2 * e, (n, rel[n])


def _blocks(w, size):
    return w.reshape(-1, size).double()


def _fp16_err(v):
    """Bound on |v - fp16(v)|: half an fp16 ulp, relative 2^-11 for normals, absolute 2^-25 for subnormals."""
    return torch.clamp(v.abs() * 2.0 ** -11, min=2.0 ** -25) * (1 + 1e-6)


def test_q8_0_error_within_half_step():
    w = torch.cat([gauss(40, 512, seed=4), _special_rows(512)])
    x, y = _blocks(w, 32), _blocks(G.quantize_dequantize(w, "Q8_0"), 32)
    d = x.abs().amax(1, keepdim=True) / 127
    # half a step, plus 127 times the fp16 rounding of the stored scale
    assert ((x - y).abs() <= d * 0.5 * (1 + 1e-6) + 127 * _fp16_err(d) + 1e-30).all()


@pytest.mark.parametrize("name,nmax", [("Q4_0", 8), ("Q5_0", 16)])
def test_symmetric_legacy_error_within_half_step(name, nmax):
    w = torch.cat([gauss(40, 512, seed=5), _special_rows(512)])
    x, y = _blocks(w, 32), _blocks(G.quantize_dequantize(w, name), 32)
    idx = x.abs().argmax(1, keepdim=True)
    d = (x.gather(1, idx) / -nmax).abs()
    err = (x - y).abs()
    slack = nmax * _fp16_err(d) + 1e-6 * d + 1e-30
    # levels -nmax..nmax-1: only a value of the opposite sign to the block max near +nmax*d is clamped a step
    clamped = (x / d * torch.sign(-x.gather(1, idx))) > nmax - 0.5 - 1e-6
    assert (err[~clamped] <= (0.5 * d + slack).expand_as(err)[~clamped]).all()
    assert (err <= d + slack).all()


@pytest.mark.parametrize("name,nmax", [("Q4_1", 15), ("Q5_1", 31)])
def test_asymmetric_legacy_error_within_half_step(name, nmax):
    w = torch.cat([gauss(40, 512, seed=6), _special_rows(512)])
    x, y = _blocks(w, 32), _blocks(G.quantize_dequantize(w, name), 32)
    mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (mx - mn) / nmax
    slack = _fp16_err(mn) + nmax * _fp16_err(d) + 1e-6 * d + 1e-30
    assert ((x - y).abs() <= 0.5 * d + slack).all()


@pytest.mark.parametrize("name,sub,levels", [("Q4_K", 32, 16), ("Q5_K", 32, 32), ("Q3_K", 16, 8),
                                             ("Q2_K", 16, 4)])
def test_k_quant_sub_blocks_use_their_grid(name, sub, levels):
    w = gauss(16, 512, seed=7)
    y = G.quantize_dequantize(w, name).reshape(-1, sub)
    distinct = torch.tensor([row.unique().numel() for row in y])
    assert (distinct <= levels).all()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0"])
def test_symmetric_types_are_idempotent(name):
    # the block max lands on the extreme level, so quantizing the output again gives the same scale and levels
    w = gauss(16, 512, seed=8)
    once = G.quantize_dequantize(w, name)
    np.testing.assert_array_equal(bits(G.quantize_dequantize(once, name)), bits(once))


@pytest.mark.parametrize("name", G.EMULATED_TYPES)
def test_zero_matrix_stays_zero(name):
    out = G.quantize_dequantize(torch.zeros(2, 256), name, importance=torch.ones(256))
    assert (out == 0).all()


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Activations like a SwiGLU output's: mostly small, a few large values per row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.rand(rows, cols, generator=g).pow(6) * 20


def test_a_llama_cpp_layer_rounds_its_input_as_ggml_does():
    """llama.cpp multiplies by a quantized matrix after rounding the input too: to 8-bit levels per 32 values (fp16
    step) for the 32-weight types, per 256 (float32 step) for the k- and i-quants. EWQ's layer does the same, so the
    sweep sees it; the 256-blocks' coarser step costs more on heavy-tailed inputs (a k-quant down_proj)."""
    from ewq.backends import QuantSettings, get_backend

    backend = get_backend("llama.cpp")
    layer = torch.nn.Linear(512, 16, bias=False)
    x = heavy_tailed(6, 512)
    errors = {}
    for fmt, block in (("Q8_0", 32), ("Q4_1", 32), ("IQ4_NL", 32), ("Q6_K", 256), ("IQ4_XS", 256)):
        rounded = G.round_activations(x, fmt)
        xb, rb = x.reshape(-1, block), rounded.reshape(-1, block)
        step = rb.abs().amax(1, keepdim=True) / 127  # the block's largest value sits on level 127
        assert torch.allclose(rb / step, torch.round(rb / step), atol=1e-3), fmt  # 255 levels, one step
        assert ((rb - xb).abs() <= 0.6 * step + 1e-6).all(), fmt  # each value to its nearest level
        errors[block] = (rounded - x).pow(2).sum().item()
        q = backend.quantize_layer(layer, fmt, QuantSettings(backend="llama.cpp"), torch.float32)
        assert torch.equal(q(x), torch.nn.functional.linear(rounded, q.weight)), fmt
        assert not torch.equal(q(x), torch.nn.functional.linear(x, q.weight)), fmt
    assert errors[256] > 2 * errors[32]
    assert torch.equal(G.round_activations(x, "BF16"), x.bfloat16().float())
    assert torch.equal(G.round_activations(torch.zeros(2, 256), "Q6_K"), torch.zeros(2, 256))


def _ggml_cpu():
    """libggml-cpu beside a found libggml-base of the llama.cpp EWQ emulates, or None."""
    import ctypes

    lib = _found_library()
    path = lib.path.with_name(lib.path.name.replace("ggml-base", "ggml-cpu")) if lib else None
    if path is None or not path.is_file():
        return None
    ctypes.CDLL(str(lib.path), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(path))


@pytest.mark.skipif(_ggml_cpu() is None, reason="no llama.cpp 0.3.36 build (llama-cpp-python or bench's tools)")
def test_activation_rounding_is_ggml_cpus_where_installed():
    """The input rounding EWQ's sweep applies is the CPU backend's own, bit for bit: the dot-product type it picks
    for every format (type_traits_cpu's vec_dot_type), and the values its from_float (AVX quantize_row_q8_0/q8_1,
    quantize_row_q8_K) stores, read back from the blocks."""
    import ctypes

    class Traits(ctypes.Structure):  # ggml-cpu.h: struct ggml_type_traits_cpu
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                    ("nrows", ctypes.c_int64)]

    cpu, base = _ggml_cpu(), _found_library()
    cpu.ggml_cpu_init()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    x = heavy_tailed(4, 1024, seed=1).numpy()
    x[1, :256] = 0  # an empty block
    for name in G.EMULATED_TYPES + ("F16", "BF16"):
        vdt = gguf.GGMLQuantizationType(cpu.ggml_get_type_traits_cpu(gguf.GGMLQuantizationType[name].value)
                                        .contents.vec_dot_type).name
        assert vdt == G.VEC_DOT_TYPE[name], name
        traits = base.lib.ggml_get_type_traits(gguf.GGMLQuantizationType[vdt].value).contents
        block, nbytes = traits.blck_size, traits.type_size  # ggml's own (gguf-py's Q8_1 is an older 40-byte block)
        out = np.zeros((x.size // block, nbytes), dtype=np.uint8)
        convert = cpu.ggml_get_type_traits_cpu(gguf.GGMLQuantizationType[vdt].value).contents.from_float
        from_float(convert)(x.ctypes.data, out.ctypes.data, x.size)
        if vdt in ("F16", "BF16"):
            got = out.view(np.float16).astype(np.float32) if vdt == "F16" else \
                (out.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif vdt == "Q8_K":  # float d, int8 qs[256], int16 bsums[16]
            got = out[:, 4:260].view(np.int8).astype(np.float32) * out[:, :4].copy().view(np.float32)
        else:  # fp16 d (Q8_1: then fp16 s), int8 qs[32]
            got = out[:, -32:].view(np.int8).astype(np.float32) * out[:, :2].copy().view(np.float16).astype(np.float32)
        want = G.round_activations(torch.from_numpy(x), name).numpy()
        np.testing.assert_array_equal(got.reshape(x.shape), want, err_msg=name)
