"""ewq.presets: llama-quantize's presets sized without llama.cpp. Byte accounting checked against EWQ's own writer
(always) and, where llama.cpp's tools are built, type for type and byte for byte against llama-quantize itself."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ewq import presets
from ewq.common import EWQError
from ewq.ggml_quants import quantize_to_bytes
from ewq.gguf_export import export_gguf

gguf = pytest.importorskip("gguf")

KQ = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K", "Q4_0", "IQ3_S", "IQ3_M")
# presets llama-quantize makes only with --imatrix (their mixes change with one too)
WEIGHTED_LADDER = ("IQ3_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ4_XS")


def llama_quantize():
    """llama-quantize from $EWQ_LLAMA_BIN, bench/llamacpp.py's build cache, or PATH; None where not built."""
    from bench.llamacpp import DEFAULT_CACHE

    for d in (os.environ.get("EWQ_LLAMA_BIN"), Path(DEFAULT_CACHE).expanduser() / "build" / "bin"):
        if d and (Path(d) / "llama-quantize").is_file():
            return Path(d) / "llama-quantize"
    found = shutil.which("llama-quantize")
    return Path(found) if found else None


def file_types(path) -> dict:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_preset_bytes_are_the_bytes_ewqs_writer_writes(tiny_factory, tmp_path):
    """Without llama.cpp: EWQ's exporter, given a preset's types tensor by tensor, writes exactly preset_size's file
    (header, every tensor's bytes, 32-byte padding). Rows of 128 make the k-quant presets fall back as llama.cpp's."""
    model = tiny_factory("llama")
    shape = presets.model_shape(model)
    for preset in ("Q8_0", "Q4_K_M"):
        size = presets.preset_size(model, preset, shape=shape)
        plan = {t.hf: size.types[t.name] for t in shape.tensors if t.type != "F32"}
        out = tmp_path / f"{preset}.gguf"
        export_gguf(model, out, plan, default_type=None, progress=False, quantize_fn=quantize_to_bytes, strict=True)
        assert out.stat().st_size == size.file_bytes, preset
        assert file_types(out) == size.types
        stats = presets.file_stats(out)
        assert stats["tensor_bytes"] == size.tensor_bytes and abs(stats["bpw"] - size.bpw) < 1e-12
    # rows of 128 take no 256-block type: Q4_K_M's Q4_K falls back to Q5_0, its Q6_K to Q8_0, as llama-quantize does;
    # ffn_down's rows of 256 keep Q4_K, and Q6_K where use_more_bits says so
    q4km = presets.preset_size(model, "Q4_K_M", shape=shape)
    rows = {t.name: t.shape[-1] for t in shape.tensors}
    assert {q4km.types[n] for n in rows if rows[n] == 128 and q4km.types[n] != "F32"} == {"Q5_0", "Q8_0"}
    assert {q4km.types[n] for n in rows if "ffn_down" in n} == {"Q4_K", "Q6_K"} and q4km.fallbacks


@pytest.mark.parametrize("tied", [True, False])
def test_decode_counts_the_matrices_a_token_is_multiplied_through(tiny_factory, tied):
    """--speed preset: with tied embeddings the head is token_embd, so it costs decode time; with a head of its own,
    a token reads one row of the embeddings and they cost none."""
    shape = presets.model_shape(tiny_factory("llama", tie_word_embeddings=tied))
    decode = presets.decode_weights(shape)
    matrices = {t.name: t.numel for t in shape.tensors if len(t.shape) == 2}
    assert ("output.weight" in matrices) is not tied
    assert decode == (matrices if tied else {k: v for k, v in matrices.items() if k != "token_embd.weight"})


def test_presets_llama_quantize_makes_only_with_an_importance_matrix(tiny_factory):
    """IQ3_XXS's (and the IQ2s') matrices need --imatrix in llama-quantize; the embeddings and head never do."""
    model = tiny_factory("llama", **KQ)
    shape = presets.model_shape(model)
    refused = presets.needs_imatrix(shape, presets.preset_size(model, "IQ3_XXS", shape=shape).types)
    assert refused and all(n.startswith("blk.") for n in refused)
    assert not presets.needs_imatrix(shape, presets.preset_size(model, "Q2_K", shape=shape).types)
    assert not presets.needs_imatrix(shape, {"token_embd.weight": "IQ3_XXS", "output.weight": "IQ2_XS"})


def test_unknown_preset_and_unsized_type_are_one_line():
    with pytest.raises(EWQError, match="unknown llama-quantize preset 'Q9_K'; choose one of"):
        presets.preset_ftype("Q9_K")
    assert presets.preset_ftype("q4_k") == "MOSTLY_Q4_K_M"  # case-insensitive, aliases as llama-quantize's


@pytest.mark.slow
def test_preset_size_matches_llama_quantize(tiny_factory, tmp_path):
    """Where llama.cpp is built: llama-quantize's own files, type for type and within 0.1 % in bytes (rows of 256
    with GQA 2, and rows of 128 that fall back)."""
    tool = llama_quantize()
    if tool is None:
        pytest.skip("llama-quantize not built (bench/llamacpp.py builds it into ~/.cache/ewq; or set EWQ_LLAMA_BIN)")
    for model in (tiny_factory("llama", **KQ), tiny_factory("llama")):
        bf16 = tmp_path / f"{model.name}-bf16.gguf"
        export_gguf(model, bf16, {}, default_type="BF16", progress=False)
        shape = presets.model_shape(model)
        imatrix = _flat_imatrix(shape, tmp_path / f"{model.name}.imatrix.gguf")
        for preset, weighted in [(p, False) for p in LADDER] + [(p, True) for p in WEIGHTED_LADDER]:
            out = tmp_path / f"{model.name}-{preset}{'-imatrix' if weighted else ''}.gguf"
            extra = ["--imatrix", str(imatrix)] if weighted else []
            p = subprocess.run([str(tool), *extra, str(bf16), str(out), preset, "1"], capture_output=True, text=True)
            assert p.returncode == 0, p.stderr[-500:]
            size = presets.preset_size(model, preset, weighted, shape=shape)
            assert file_types(out) == size.types, (model.name, preset, weighted)
            assert abs(out.stat().st_size - size.file_bytes) <= 0.001 * out.stat().st_size, (model.name, preset)


def _flat_imatrix(shape, path):
    """An importance of 1 for every column of every block matrix, as a llama-imatrix GGUF (what the weighted presets
    need; the values do not change the types)."""
    import numpy as np

    from ewq.imatrix import Imatrix, save_imatrix

    names = [t for t in shape.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    im = Imatrix(sums={t.name: np.ones(t.shape[-1], np.float32) for t in names},
                 counts={t.name: 1 for t in names}, datasets=["flat"], chunk_count=1, chunk_size=1)
    return save_imatrix(im, path)
