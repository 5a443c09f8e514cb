"""Facts about llama.cpp's tensor types (ggml types) that the plan, the emulation, the GGUF writer and the preset
sizer all need: which quantized types EWQ can plan and write, each type's block, and what llama-quantize writes when
a row is not whole blocks of the type it wants.

A leaf: it imports nothing of EWQ's but the error type, and gguf-py only when a block size is asked for, so
`ewq.plan` stays importable without it.
"""

from __future__ import annotations

from .common import EWQError

# the llama.cpp EWQ builds and checks its emulation against: the one llama-cpp-python 0.3.36 vendors (0c1e570)
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# where bench/llamacpp.py builds its tools (llama-quantize, llama-perplexity, ...) and their libggml-base
TOOLS_CACHE = f"~/.cache/ewq/llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
FLOAT_TYPES = ("F32", "F16", "BF16")
# The quantized types a plan may name for the llama.cpp executor: ewq.ggml_quants emulates each bit for bit (with
# and without an importance matrix) and ewq.gguf_export writes each. Order: roughly large to small, as menus show.
GGML_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "Q4_0", "Q5_1", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K",
              "IQ3_XXS", "IQ3_S", "IQ2_XS")
# the types ggml rounds only with an importance matrix (quantize_row_iq2_xs_impl asserts one): a matrix without one
# (EWQ's own importance covers the blocks' matrices, not the token embeddings) cannot take them
NEEDS_IMPORTANCE = ("IQ2_XS",)

# ggml-cpu.c type_traits_cpu[type].vec_dot_type: the type ggml's CPU backend converts a product's input (the
# activations) to before multiplying by a matrix of each type. The activations are rounded as well as the weights:
# per 32 values with an fp16 scale for the 32-weight types, per 256 with a float32 one for the k- and i-quants
# (docs/RESULTS.md, round 13: most of a Q8_0 file's KLD on SmolLM2 is this rounding, not the weights').
VEC_DOT_TYPE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q5_0": "Q8_0",
                "IQ4_NL": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                **{t: "Q8_K" for t in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XS")}}

# llama-quant.cpp tensor_type_fallback(): the type llama-quantize writes when a row is not whole blocks of the type
# it chose (then F16 if the fallback does not fit either). SmolLM2's hidden size 576 is not a multiple of 256, so
# its Q4_K_M is mostly Q5_0. 32-block types have nothing smaller to fall back to.
FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_0": "Q4_0", "Q2_K": "Q4_0",
            "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type: gguf-py's table (exact); Q2_0, newer than it, from
    ggml-common.h."""
    import gguf

    if type_name == "Q2_0":  # block_q2_0 = fp16 scale + 64 2-bit weights
        return 64, 18
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    except KeyError:
        raise EWQError(f"unknown ggml type {type_name}") from None


def row_bytes(type_name: str, n: int) -> int:
    """ggml_row_size: bytes of one row of n weights (n whole blocks)."""
    weights, nbytes = block(type_name)
    return n // weights * nbytes


def bits_per_weight(type_name: str) -> float:
    weights, nbytes = block(type_name)
    return 8 * nbytes / weights


def llama_quantize_fallback(type_name: str, n_cols: int) -> str:
    """The type llama-quantize writes for rows of n_cols weights when asked for type_name (tensor_type_fallback):
    the type itself if the rows are whole blocks, else its fallback (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0, the i-quants -> IQ4_NL), else F16. It warns ("N of M tensor(s) required fallback quantization")
    and goes on. Applies to the mixture's own choices and to --tensor-type overrides, not to --token-embedding-type /
    --output-tensor-type (a type the rows cannot take aborts the run there)."""
    if n_cols % block(type_name)[0] == 0:
        return type_name
    used = FALLBACK.get(type_name)
    if used is None:
        if block(type_name)[0] > 32:
            raise EWQError(f"llama-quantize defines no fallback for {type_name} (rows of {n_cols})")
        used = type_name
    return used if n_cols % block(used)[0] == 0 else "F16"
