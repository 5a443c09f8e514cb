"""llama-quantize's presets (Q4_K_M, Q6_K, IQ4_XS, ...) sized for a checkpoint without running llama.cpp.

    preset_size(model_dir, "Q4_K_M")            -> PresetSize(file_bytes, tensor_bytes, bpw, types, ...)
    preset_tensor_types(shape, "Q3_K_M")         -> {gguf tensor name: ggml type}

A port of the per-tensor type choice of llama-quantize in the llama.cpp that llama-cpp-python 0.3.36 vendors
(src/llama-quant.cpp: llama_tensor_get_type, llama_tensor_get_type_impl, tensor_type_fallback,
tensor_allows_quantization, llama_ftype_get_default_type; the preset names of tools/quantize/quantize.cpp), for
the dense layouts EWQ writes (Llama, Mistral, Qwen2: no experts, not Falcon, no per-layer embeddings). The
tensors are walked in llama-quantize's order (llama_model_loader's weight_name_comparer: tensors outside the
blocks by name, then block by block, by name), so its counters (i_attention_wv, i_ffn_down, ...) count as its do.

Sizes are exact: every tensor's bytes are rows x ggml_row_size(type, row length) (what llama-quantize writes, and
what it sums for the "quant size ... BPW" it prints: bits per weight = 8 x tensor bytes / all the file's elements,
norms included); the file adds the GGUF header (key-values and tensor infos, as EWQ's exporter writes them for
this checkpoint, which is what llama-quantize copies from the BF16 file EWQ writes) and pads every tensor to 32
bytes. With an importance matrix llama-quantize chooses differently for some presets (IQ4_XS/IQ4_NL keep the first
ffn_down in IQ4, Q4_0 raises them to Q4_1, IQ3_XXS) and records four quantize.imatrix.* keys: `imatrix` covers both.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .common import EWQError
from .ggml_types import block, llama_quantize_fallback, row_bytes

# tools/quantize/quantize.cpp QUANT_OPTIONS: preset name -> llama_ftype (LLAMA_FTYPE_* without the prefix)
PRESETS = {
    "Q1_0": "MOSTLY_Q1_0", "Q2_0": "MOSTLY_Q2_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
    "MXFP4_MOE": "MOSTLY_MXFP4_MOE", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    "IQ2_XXS": "MOSTLY_IQ2_XXS", "IQ2_XS": "MOSTLY_IQ2_XS", "IQ2_S": "MOSTLY_IQ2_S", "IQ2_M": "MOSTLY_IQ2_M",
    "IQ1_S": "MOSTLY_IQ1_S", "IQ1_M": "MOSTLY_IQ1_M", "TQ1_0": "MOSTLY_TQ1_0", "TQ2_0": "MOSTLY_TQ2_0",
    "Q2_K": "MOSTLY_Q2_K", "Q2_K_S": "MOSTLY_Q2_K_S", "IQ3_XXS": "MOSTLY_IQ3_XXS", "IQ3_S": "MOSTLY_IQ3_S",
    "IQ3_M": "MOSTLY_IQ3_M", "Q3_K": "MOSTLY_Q3_K_M", "IQ3_XS": "MOSTLY_IQ3_XS", "Q3_K_S": "MOSTLY_Q3_K_S",
    "Q3_K_M": "MOSTLY_Q3_K_M", "Q3_K_L": "MOSTLY_Q3_K_L", "IQ4_NL": "MOSTLY_IQ4_NL", "IQ4_XS": "MOSTLY_IQ4_XS",
    "Q4_K": "MOSTLY_Q4_K_M", "Q4_K_S": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
    "Q5_K_S": "MOSTLY_Q5_K_S", "Q5_K_M": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "Q8_0": "MOSTLY_Q8_0",
    "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32",
}

# llama_ftype_get_default_type
DEFAULT_TYPE = {
    "MOSTLY_Q4_0": "Q4_0", "MOSTLY_Q4_1": "Q4_1", "MOSTLY_Q5_0": "Q5_0", "MOSTLY_Q5_1": "Q5_1", "MOSTLY_Q8_0": "Q8_0",
    "MOSTLY_F16": "F16", "MOSTLY_BF16": "BF16", "ALL_F32": "F32", "MOSTLY_Q1_0": "Q1_0", "MOSTLY_Q2_0": "Q2_0",
    "MOSTLY_MXFP4_MOE": "MXFP4", "MOSTLY_Q2_K_S": "Q2_K", "MOSTLY_Q2_K": "Q2_K", "MOSTLY_IQ3_XS": "IQ3_S",
    "MOSTLY_Q3_K_S": "Q3_K", "MOSTLY_Q3_K_M": "Q3_K", "MOSTLY_Q3_K_L": "Q3_K", "MOSTLY_Q4_K_S": "Q4_K",
    "MOSTLY_Q4_K_M": "Q4_K", "MOSTLY_Q5_K_S": "Q5_K", "MOSTLY_Q5_K_M": "Q5_K", "MOSTLY_Q6_K": "Q6_K",
    "MOSTLY_TQ1_0": "TQ1_0", "MOSTLY_TQ2_0": "TQ2_0", "MOSTLY_IQ2_XXS": "IQ2_XXS", "MOSTLY_IQ2_XS": "IQ2_XS",
    "MOSTLY_IQ2_S": "IQ2_XS", "MOSTLY_IQ2_M": "IQ2_S", "MOSTLY_IQ3_XXS": "IQ3_XXS", "MOSTLY_IQ1_S": "IQ1_S",
    "MOSTLY_IQ1_M": "IQ1_M", "MOSTLY_IQ4_NL": "IQ4_NL", "MOSTLY_IQ4_XS": "IQ4_XS", "MOSTLY_IQ3_S": "IQ3_S",
    "MOSTLY_IQ3_M": "IQ3_S",
}

GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: the header and every tensor are padded to it
IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count")
_LOW_IQ = ("MOSTLY_IQ2_XXS", "MOSTLY_IQ2_XS", "MOSTLY_IQ1_S", "MOSTLY_IQ2_S", "MOSTLY_IQ2_M", "MOSTLY_IQ1_M")


def pad(n: int, align: int = GGUF_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def preset_ftype(preset: str) -> str:
    """The llama_ftype of a preset name (case-insensitive, aliases Q3_K/Q4_K/Q5_K), or one EWQError line."""
    name = str(preset).strip().upper()
    if name not in PRESETS:
        raise EWQError(f"unknown llama-quantize preset '{preset}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class TensorShape:
    name: str          # llama.cpp's name (blk.3.attn_v.weight)
    shape: tuple       # Hugging Face order: [..., row length]; ne0 = shape[-1]
    type: str          # the type in the file llama-quantize reads (EWQ's BF16/F16 export: F32 for norms)
    hf: str | None = None  # the checkpoint's name for it (None: made by the converter, llama3's rope factors)

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelShape:
    """What llama-quantize's choice depends on: the architecture, heads, layers and every tensor."""
    arch: str                  # gguf architecture: llama, qwen2
    n_layer: int
    n_head: int
    n_head_kv: int
    tensors: list              # [TensorShape], any order
    type_70b: bool = False     # LLM_TYPE_70B: llama.cpp's only model type that changes a choice (attn_v)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _category(name: str) -> str:
    """tensor_get_category: broad roles by name."""
    if name == "output.weight":
        return "OUTPUT"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "TOKEN_EMBD"
    for part, cat in (("attn_qkv.weight", "ATTENTION_QKV"), ("attn_kv_b.weight", "ATTENTION_KV_B"),
                      ("attn_v.weight", "ATTENTION_V"), ("attn_k.weight", "ATTENTION_K"),
                      ("attn_q.weight", "ATTENTION_Q"), ("attn_output.weight", "ATTENTION_OUTPUT"),
                      ("ffn_up", "FFN_UP"), ("ffn_gate", "FFN_GATE"), ("ffn_down", "FFN_DOWN")):
        if part in name:
            return cat
    return "OTHER"


def _allows_quantization(t: TensorShape) -> bool:
    """tensor_allows_quantization, for the tensors of the dense layouts EWQ writes."""
    return len(t.shape) >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _State:
    """quantize_state_impl's counters."""
    n_attention_wv: int
    n_layer: int
    tied: bool
    imatrix: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    fallbacks: list = field(default_factory=list)


def _output_type(new: str, ne0: int, ftype: str) -> str:
    """The output head's type (and the token embeddings' when they are tied to it)."""
    if ftype == "MOSTLY_MXFP4_MOE" or ne0 % block(new)[0]:
        return "Q8_0"
    if ftype in _LOW_IQ + ("MOSTLY_IQ3_XXS",):
        return "Q5_K"
    return "Q6_K" if new != "Q8_0" else new


def _attn_v_type(qs: _State, m: ModelShape, new: str, ftype: str) -> str:
    i, n, gqa = qs.i_attention_wv, qs.n_attention_wv, m.n_gqa
    if ftype == "MOSTLY_Q2_K":
        new = "Q4_K" if gqa >= 4 else "Q3_K"
    elif ftype == "MOSTLY_Q2_K_S" and gqa >= 4:
        new = "Q4_K"
    elif ftype == "MOSTLY_IQ3_XXS":
        new = "Q4_K" if gqa >= 4 else "IQ3_S" if not qs.imatrix else "IQ3_XXS"
    elif ftype in ("MOSTLY_IQ3_XS", "MOSTLY_IQ3_S") and gqa >= 4:
        new = "Q4_K"
    elif ftype == "MOSTLY_IQ3_M":
        new = "Q4_K"
    elif ftype == "MOSTLY_Q3_K_M":
        new = "Q5_K" if i < 2 else "Q4_K"
    elif ftype == "MOSTLY_Q3_K_L":
        new = "Q5_K"
    elif ftype in ("MOSTLY_IQ4_NL", "MOSTLY_IQ4_XS") and gqa >= 4:
        new = "Q5_K"
    elif ftype in ("MOSTLY_Q4_K_M", "MOSTLY_Q5_K_M") and _use_more_bits(i, n):
        new = "Q6_K"
    elif ftype == "MOSTLY_Q4_K_S" and i < 4:
        new = "Q5_K"
    if m.type_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"
    return new


def _ffn_down_type(qs: _State, new: str, ftype: str) -> str:
    i, n = qs.i_ffn_down, qs.n_layer
    if ftype == "MOSTLY_Q2_K":
        return "Q3_K"
    if ftype == "MOSTLY_Q2_K_S":
        return "Q4_K" if i < n // 8 else new
    if ftype == "MOSTLY_IQ3_XXS" and not qs.imatrix:
        return "Q4_K" if i < n // 8 else "Q3_K"
    if ftype == "MOSTLY_Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"  # (not Falcon: use_more_bits is Falcon's)
    if ftype == "MOSTLY_IQ3_M":
        return "Q4_K" if i < n // 8 else new
    if ftype == "MOSTLY_Q3_K_L":
        return "Q5_K"
    if ftype == "MOSTLY_Q4_K_M":
        return "Q6_K" if _use_more_bits(i, n) else new
    if i < n // 8 and ftype in ("MOSTLY_IQ4_NL", "MOSTLY_IQ4_XS") and not qs.imatrix:
        return "Q5_K"
    if ftype == "MOSTLY_Q5_K_M":
        return "Q6_K" if _use_more_bits(i, n) else new
    if ftype == "MOSTLY_Q4_K_S":
        return "Q5_K" if i < n // 8 else new
    if ftype in ("MOSTLY_Q4_0", "MOSTLY_Q5_0") and qs.imatrix and i < n // 8:
        return "Q4_1" if ftype == "MOSTLY_Q4_0" else "Q5_1"
    return new


def _low_iq_type(qs: _State, m: ModelShape, new: str, ftype: str, cat: str) -> str:
    """The IQ1/IQ2 presets' own rules (llama_tensor_get_type_impl's first branch for them)."""
    iq3 = ftype in ("MOSTLY_IQ2_S", "MOSTLY_IQ2_M")
    if cat in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B"):
        new = "Q4_K" if m.n_gqa >= 4 else "IQ3_S" if iq3 else "Q2_K"
        qs.i_attention_wv += 1
    elif cat == "FFN_DOWN":
        if qs.i_ffn_down < qs.n_layer // 8:
            new = "IQ3_S" if iq3 else "Q2_K"
        qs.i_ffn_down += 1
    elif cat == "ATTENTION_OUTPUT":
        if ftype in ("MOSTLY_IQ1_S", "MOSTLY_IQ1_M"):
            new = "IQ2_XXS"
        elif iq3:
            new = "IQ3_S"
    return new


def _choose(qs: _State, m: ModelShape, new: str, t: TensorShape, ftype: str, cat: str) -> str:
    """llama_tensor_get_type_impl for dense, non-Falcon models."""
    if cat == "OUTPUT" or (qs.tied and cat == "TOKEN_EMBD"):
        return _output_type(new, t.shape[-1], ftype)
    if ftype == "MOSTLY_MXFP4_MOE":
        return "Q8_0"  # no expert tensors here
    if cat == "TOKEN_EMBD":
        if ftype in ("MOSTLY_IQ2_XXS", "MOSTLY_IQ2_XS", "MOSTLY_IQ1_S", "MOSTLY_IQ1_M"):
            return "Q2_K"
        if ftype in ("MOSTLY_IQ2_S", "MOSTLY_IQ2_M", "MOSTLY_IQ3_XXS"):
            return "IQ3_S"
        if ftype in ("MOSTLY_TQ1_0", "MOSTLY_TQ2_0", "MOSTLY_Q2_0"):
            return "Q4_K"
        return new
    if ftype in _LOW_IQ:
        return _low_iq_type(qs, m, new, ftype, cat)
    if cat in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B"):  # (llama.cpp's later ATTENTION_QKV branch is
        new = _attn_v_type(qs, m, new, ftype)                           # never reached: this one catches it)
        qs.i_attention_wv += 1
    elif cat in ("ATTENTION_K", "ATTENTION_Q"):
        if ftype == "MOSTLY_IQ3_XS":
            new = "IQ3_XXS"
        elif ftype == "MOSTLY_IQ3_XXS":
            new = "IQ2_S"
    elif cat == "FFN_DOWN":
        new = _ffn_down_type(qs, new, ftype)
        qs.i_ffn_down += 1
    elif cat == "ATTENTION_OUTPUT":
        new = {"MOSTLY_Q2_K": "Q3_K", "MOSTLY_IQ3_XXS": "IQ3_S", "MOSTLY_Q3_K_M": "Q4_K", "MOSTLY_Q3_K_L": "Q5_K",
               "MOSTLY_IQ3_M": "Q4_K"}.get(ftype, new)
    elif cat in ("FFN_GATE", "FFN_UP"):
        i = qs.i_ffn_gate if cat == "FFN_GATE" else qs.i_ffn_up
        if ftype == "MOSTLY_IQ3_XS" and qs.n_layer // 8 <= i < 7 * qs.n_layer // 8:
            new = "IQ3_XXS"
        if cat == "FFN_GATE":
            qs.i_ffn_gate += 1
        else:
            qs.i_ffn_up += 1
    return new


def _fallback(qs: _State, t: TensorShape, target: str) -> str:
    """tensor_type_fallback: a row that is not whole blocks of the target type."""
    used = llama_quantize_fallback(target, t.shape[-1])
    if used != target:
        qs.fallbacks.append((t.name, target, used))
    return used


def preset_tensor_types(m: ModelShape, preset: str, imatrix: bool = False) -> tuple[dict, list]:
    """({tensor name: ggml type llama-quantize writes}, [(name, asked, fallback)]) for a preset (llama_tensor_get_type
    over every tensor, in llama-quantize's order)."""
    ftype = preset_ftype(preset)
    default = DEFAULT_TYPE[ftype]
    order = sorted(m.tensors, key=lambda t: (_layer(t.name), t.name))  # weight_name_comparer
    cats = {t.name: _category(t.name) for t in order}
    qs = _State(n_attention_wv=sum(c in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B") for c in cats.values()),
                n_layer=m.n_layer, tied="OUTPUT" not in cats.values(), imatrix=imatrix)
    quantized_default = default not in ("F32", "F16", "BF16")
    types = {}
    for t in order:
        if not _allows_quantization(t):
            types[t.name] = t.type
        elif not quantized_default:
            types[t.name] = default
        else:
            types[t.name] = _fallback(qs, t, _choose(qs, m, default, t, ftype, cats[t.name]))
    return types, qs.fallbacks


# llama-quant.cpp tensor_requires_imatrix: the types llama-quantize refuses to write without --imatrix (but for the
# token embeddings and the output head, which it writes anyway)
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")


def needs_imatrix(m: ModelShape, types: dict) -> list:
    """The tensors of a type choice ({name: type}) that llama-quantize would refuse to write without an importance
    matrix ("this quantization requires an imatrix!")."""
    out = {t.name for t in m.tensors if _category(t.name) in ("TOKEN_EMBD", "OUTPUT")}
    return [n for n, t in types.items() if t in NEEDS_IMATRIX and n not in out]


# ---- the checkpoint's tensors and the file's header ----

def model_shape(model_dir, reference_type: str = "BF16") -> ModelShape:
    """The tensors of the GGUF EWQ's exporter writes for this checkpoint (matrices in `reference_type`, norms F32),
    read from the safetensors headers only."""
    from . import gguf_export as ge

    model_dir = Path(model_dir)
    hparams = ge.load_hparams(model_dir)
    _, arch, _ = ge.detect_arch(model_dir, hparams)
    n_layer = ge.find_hparam(hparams, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"], optional=False)
    n_head = ge.find_hparam(hparams, ["n_heads", "num_attention_heads"], optional=False)
    n_head_kv = ge.find_hparam(hparams, ["n_kv_heads", "num_key_value_heads"]) or n_head
    tensors = [TensorShape(e["gguf"], tuple(e["shape"]), "F32" if e["float_only"] else reference_type, hf)
               for hf, e in ge._checkpoint_entries(model_dir, arch, n_layer).items()]
    extra = ge.llama3_rope_factors(hparams) if arch == "llama" else None
    if extra is not None:
        tensors.append(TensorShape("rope_freqs.weight", tuple(extra.shape), "F32"))
    type_70b = n_layer == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))
    return ModelShape(arch, n_layer, n_head, n_head_kv, tensors, type_70b)


def header_bytes(model_dir, reference_type: str = "BF16", extra_kv: dict | None = None) -> int:
    """Bytes before the first tensor in the GGUF EWQ's exporter writes for this checkpoint (magic, counts,
    key-values, tensor infos, padding to 32), plus `extra_kv` ({key: str or int}: string or uint32 values, as
    llama-quantize adds its quantize.imatrix.* keys). Independent of the tensors' types: an info has a fixed size."""
    from . import gguf_export as ge

    model_dir = Path(model_dir)
    size = _writer_header(model_dir, ge, reference_type)
    for key, value in (extra_kv or {}).items():
        size += 8 + len(key.encode()) + 4 + (8 + len(str(value).encode()) if isinstance(value, str) else 4)
    return pad(size)


_HEADER_CACHE: dict = {}


def _writer_header(model_dir: Path, ge, reference_type: str) -> int:
    """Unpadded header bytes of EWQ's export, written (without any tensor data) to a temporary file."""
    import gguf

    key = (str(model_dir.resolve()), reference_type, _mtimes(model_dir))
    if key in _HEADER_CACHE:
        return _HEADER_CACHE[key]
    hparams = ge.load_hparams(model_dir)
    _, arch, _ = ge.detect_arch(model_dir, hparams)
    n_layer = ge.find_hparam(hparams, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"], optional=False)
    entries = ge._checkpoint_entries(model_dir, arch, n_layer)
    written = {n: "F32" if e["float_only"] else reference_type for n, e in entries.items()}
    writer = gguf.GGUFWriter(path=None, arch=arch)
    ge._add_tensor_infos(writer, entries, written, ge.llama3_rope_factors(hparams) if arch == "llama" else None)
    ge._add_metadata(writer, model_dir, None, hparams, arch, n_layer, ge._file_type(entries, written), [])
    ge._add_vocab(writer, model_dir, hparams, arch, None, [])
    with tempfile.TemporaryDirectory(prefix="ewq-header-") as tmp:
        path = Path(tmp) / "header.gguf"
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        size = writer.fout[0].tell()
        writer.close()
    _HEADER_CACHE[key] = size
    return size


def _mtimes(model_dir: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file()))


@dataclass
class PresetSize:
    preset: str
    imatrix: bool
    file_bytes: int            # the GGUF llama-quantize writes: header + every tensor padded to 32
    tensor_bytes: int          # sum of the tensors' bytes (llama-quantize's "quant size")
    n_elements: int            # every tensor's elements, norms included
    header_bytes: int
    types: dict                # {tensor name: ggml type}
    fallbacks: list            # [(tensor, asked type, written type)]

    @property
    def bpw(self) -> float:
        """Bits per weight as llama-quantize prints it: 8 x tensor bytes / all elements."""
        return 8 * self.tensor_bytes / self.n_elements

    def type_counts(self) -> dict:
        counts = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def decode_weights(m: ModelShape) -> dict:
    """{tensor name: elements} of the matrices a decoded token is multiplied through: every 2-D weight but the
    token embeddings when the model has its own output head (llama.cpp reads one row of them per token); a model
    with tied embeddings multiplies by token_embd as its head."""
    untied = any(t.name == "output.weight" for t in m.tensors)
    return {t.name: t.numel for t in m.tensors if len(t.shape) == 2 and not (untied and t.name == "token_embd.weight")}


def tensor_bytes(m: ModelShape, types: dict) -> dict:
    """{tensor name: bytes} of every tensor in its type."""
    return {t.name: t.rows * row_bytes(types[t.name], t.shape[-1]) for t in m.tensors}


def preset_size(model_dir, preset: str, imatrix: bool | dict = False, reference_type: str = "BF16",
                shape: ModelShape | None = None) -> PresetSize:
    """The file llama-quantize writes from EWQ's `reference_type` export of the checkpoint with this preset.
    imatrix: True (choices as with an importance matrix; its four keys counted with a 64-character file name and
    dataset) or {key: value} of the quantize.imatrix.* keys as they will be."""
    m = shape or model_shape(model_dir, reference_type)
    types, fallbacks = preset_tensor_types(m, preset, bool(imatrix))
    sizes = tensor_bytes(m, types)
    kv = None
    if imatrix:
        kv = imatrix if isinstance(imatrix, dict) else {IMATRIX_KEYS[0]: "x" * 64, IMATRIX_KEYS[1]: "x" * 64,
                                                        IMATRIX_KEYS[2]: 0, IMATRIX_KEYS[3]: 0}
    header = header_bytes(model_dir, reference_type, kv)
    return PresetSize(str(preset).strip().upper(), bool(imatrix), header + sum(pad(n) for n in sizes.values()),
                      sum(sizes.values()), sum(t.numel for t in m.tensors), header, types, fallbacks)


def read_gguf(gguf_path):
    """gguf-py's reader of a GGUF file (memory-mapped); a missing or damaged file is one EWQError line."""
    import gguf

    path = Path(gguf_path)
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise EWQError(f"cannot read GGUF file {path}: {e}") from None


def file_stats(gguf_path) -> dict:
    """A GGUF file's size and bits per weight as llama-quantize counts them (tensor bytes x 8 / elements)."""
    path = Path(gguf_path)
    reader = read_gguf(path)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    return {"file_bytes": path.stat().st_size, "tensor_bytes": nbytes, "n_elements": elements,
            "bpw": 8 * nbytes / elements if elements else 0.0}
