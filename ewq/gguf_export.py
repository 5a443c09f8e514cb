"""Write a GGUF file that llama.cpp loads, with one ggml type per tensor, from a Hugging Face checkpoint.

    export_gguf(model_dir, out_path, tensor_types, default_type="BF16") -> dict

`tensor_types` maps Hugging Face tensor names ("model.layers.3.self_attn.q_proj.weight",
"model.embed_tokens.weight", "lm_head.weight") to ggml type names. Matrices it does not name get
`default_type` (None: every matrix must be named). What is written follows llama.cpp's own converter
(vendored convert_hf_to_gguf.py, classes LlamaModel / Qwen2Model / TextModel) so that a plan of all
BF16 gives the converter's `--outtype bf16` file: same metadata, same tensor names, shapes and bytes.

Types
  * F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1: quantized here with gguf-py's numpy code
    (gguf.quants.quantize, bit-exact with ggml's reference quantizers) and written in the final type.
  * Q6_K, Q5_K, Q4_K, Q3_K, Q2_K (k-quants), IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XS: gguf-py cannot quantize them. Unless a `quantize_fn` is
    given (see below), they are written losslessly in a 16-bit intermediate (the checkpoint's own
    16-bit type, F32 for fp32 checkpoints) and the result's "llama_quantize_args" are the arguments
    with which llama.cpp's `llama-quantize` turns that file into the plan (see llama_quantize_args).
  * quantize_fn(weight: torch.Tensor float32 [rows, cols], ggml_type: str) -> bytes / uint8 array:
    a plug-in for the types gguf-py cannot quantize (e.g. a later ewq.ggml_quants.quantize_to_bytes).
    It is called on slabs of whole rows (ggml quantizes each row on its own) and must return exactly
    rows * row_bytes bytes in ggml's block layout. With it, k-quants are written natively.
  * importance ({GGUF name: float32 [cols]}, ewq.imatrix): the matrices it names are rounded as
    `llama-quantize --imatrix` rounds them (ewq.ggml_quants with importance; Q8_0 and float types ignore it), and
    the file gets llama-quantize's quantize.imatrix.* keys (imatrix_metadata).

Fixed by llama.cpp's converter, not by the plan: 1-D tensors (norms, biases) and `*_norm.weight` are
F32; naming one of them with anything but F32 is an error.

Row lengths that do not fit a type's block (ggml needs ne0 = the matrix's row length, the HF
in_features, to be a multiple of 32, or of 256 for k-quants): the exporter falls back exactly as
llama-quantize's tensor_type_fallback does -- Q6_K->Q8_0, Q5_K->Q5_1, Q4_K->Q5_0, Q3_K/Q2_K->Q4_0, and
F16 when even 32 does not divide the row -- prints a warning and records it in the result's
"fallbacks"; strict=True refuses instead. (SmolLM2-135M's rows of 576 take no k-quant: only ffn_down,
rows of 1536, does.)

Layouts: LlamaForCausalLM (incl. SmolLM/SmolLM2), MistralForCausalLM (GGUF arch "llama", q/k rows
permuted as the converter's LlamaModel.permute does) and Qwen2ForCausalLM (arch "qwen2", no
permutation, q/k/v biases). Everything else is refused with one EWQError line.

Tokenizer: byte-level BPE (tokenizer.json as GPT-2, SmolLM2, Qwen2, Llama-3 use it), tokenizer model
"gpt2". `tokenizer.ggml.pre` is found as the converter's get_vocab_base_pre does it: encode a fixed
text with the tokenizer transformers loads, sha256 the token ids, look the hash up in a copy of the
converter's table (its entries for tokenizers of llama / mistral / qwen2 checkpoints). An unknown hash is
not guessed as "default" (a wrong pre-tokenizer makes llama.cpp split text differently from the
original, silently): the pipeline transformers actually runs is recognized when it is exactly one that
llama.cpp implements -- GPT-2's ByteLevel regex ("gpt-2"), digits + that ("smollm"), Qwen2's or
Llama-3's Split regex + ByteLevel ("qwen2", "llama-bpe") -- and anything else is refused with one
EWQError line; `pre_tokenizer="name"` overrides both. (The converter itself refuses every unknown
hash; the tests' tiny byte-level tokenizers are recognized by structure.) SentencePiece vocabularies
(tokenizer.model: Llama-2, Mistral v0.1-0.3, or tokenizer.json with byte fallback) are refused.

The file is written one tensor at a time (safetensors read lazily, each tensor converted and
quantized in slabs of rows), to a temporary file next to `out_path` that is renamed only when
complete: an error or Ctrl-C leaves no partial file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path

import numpy as np

from .common import EWQError
from .ggml_types import FLOAT_TYPES, GGML_TYPES, NEEDS_IMPORTANCE, llama_quantize_fallback, row_bytes
from .ggml_types import block as _block

# ---------------------------------------------------------------------------------------------------------------
# types

NUMPY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")  # gguf.quants.quantize can write them
KQUANT_TYPES = tuple(t for t in GGML_TYPES if t not in NUMPY_TYPES)  # gguf-py cannot: ewq.ggml_quants writes them
TYPES = NUMPY_TYPES + KQUANT_TYPES

# general.file_type of a file whose matrices are mostly of one type (llama-quantize's QUANT_OPTIONS aliases)
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
              "Q6_K": "MOSTLY_Q6_K", "Q5_K": "MOSTLY_Q5_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q3_K": "MOSTLY_Q3_K_M",
              "Q2_K": "MOSTLY_Q2_K", "IQ4_NL": "MOSTLY_IQ4_NL", "IQ4_XS": "MOSTLY_IQ4_XS", "IQ3_XXS": "MOSTLY_IQ3_XXS",
              "IQ3_S": "MOSTLY_IQ3_S", "IQ2_XS": "MOSTLY_IQ2_XS"}

# ggml_type_name() spellings, as llama-quantize prints and parses them (it compares case-insensitively)
GGML_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q5_0": "q5_0", "Q5_1": "q5_1",
              "Q4_0": "q4_0", "Q4_1": "q4_1", "Q6_K": "q6_K", "Q5_K": "q5_K", "Q4_K": "q4_K", "Q3_K": "q3_K",
              "Q2_K": "q2_K", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs", "IQ3_XXS": "iq3_xxs", "IQ3_S": "iq3_s",
              "IQ2_XS": "iq2_xs"}

SLAB_BYTES = 64 << 20  # float32 bytes converted / quantized at a time


def _gguf():
    import gguf

    return gguf


def normalize_type(name: str, where: str = "") -> str:
    t = str(name).strip().upper()
    if t not in TYPES:
        raise EWQError(f"unknown ggml type '{name}'{where}; use one of {', '.join(TYPES)}")
    return t


def block_size(t: str) -> int:
    return _block(t)[0]


# ---------------------------------------------------------------------------------------------------------------
# layouts

# HF architecture -> (gguf MODEL_ARCH member name, undo the q/k rope permutation)
ARCHS = {
    "LlamaForCausalLM": ("LLAMA", True),
    "LLaMAForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def llama_permute(w, n_head: int, n_head_kv: int | None = None):
    """convert_hf_to_gguf LlamaModel.permute: HF's rotate-half q/k rows -> llama.cpp's interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def llama_unpermute(w, n_head: int, n_head_kv: int | None = None):
    """The inverse of llama_permute (a GGUF q/k matrix back to the HF row order)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def load_hparams(model_dir: Path) -> dict:
    """config.json as the converter reads it (ModelBase.load_hparams: AutoConfig(...).to_dict(), else the raw json)."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EWQError(f"{model_dir} has no config.json; export_gguf needs a Hugging Face checkpoint directory")
    try:
        from transformers import AutoConfig

        hparams = AutoConfig.from_pretrained(model_dir, trust_remote_code=False).to_dict()
    except Exception:  # noqa: BLE001 -- as the converter: a config AutoConfig cannot read is read as json
        with open(cfg_path, encoding="utf-8") as f:
            hparams = json.load(f)
    if "text_config" in hparams:
        hparams = {**hparams, **hparams["text_config"]}
    return hparams


def find_hparam(hparams: dict, keys, optional: bool = True):
    key = next((k for k in keys if k in hparams), None)
    if key is not None:
        return hparams[key]
    if optional:
        return None
    raise EWQError(f"config.json has none of {', '.join(keys)}")


def detect_arch(model_dir: Path, hparams: dict) -> tuple[str, str, bool]:
    """(HF architecture, gguf arch name, permute q/k) -- or one EWQError line."""
    arches = hparams.get("architectures") or []
    # no "architectures" (a config saved on its own, as ewq.synthetic writes it): the causal LM of its model_type
    hf_arch = arches[0] if arches else MODEL_TYPES.get(hparams.get("model_type"))
    if hf_arch not in ARCHS:
        raise EWQError(f"{model_dir.name}: architecture {hf_arch or hparams.get('model_type', 'unknown')} cannot be "
                       f"exported to GGUF here; supported: {', '.join(sorted(set(ARCHS) - {'LLaMAForCausalLM'}))}")
    if hparams.get("quantization_config"):
        raise EWQError(f"{model_dir.name} is already quantized ({hparams['quantization_config'].get('quant_method')}); "
                       "export_gguf needs 16- or 32-bit weights")
    gguf = _gguf()
    member, permute = ARCHS[hf_arch]
    return hf_arch, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[member]], permute


def rope_parameters(hparams: dict) -> dict:
    """TextModel.__init__'s view of the rope settings (transformers 5 rope_parameters or 4.x rope_scaling + rope_theta)."""
    rp = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    theta = find_hparam(hparams, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                  "rotary_emb_base"])
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and (rtype := rp.get("type")) is not None:
            rp["rope_type"] = rtype
        if (orig := find_hparam(hparams, ["original_max_position_embeddings"])) is not None:
            rp.setdefault("original_max_position_embeddings", orig)
    return rp


# ---------------------------------------------------------------------------------------------------------------
# tensors of the checkpoint


def safetensors_parts(model_dir: Path) -> list[Path]:
    """The converter's choice of files: the index's shards, else every model*.safetensors, sorted."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map") or {}
        parts = sorted(set(weight_map.values()))
    else:
        parts = sorted(p.name for p in model_dir.iterdir() if p.name.startswith("model") and p.name.endswith(".safetensors"))
    if not parts:
        raise EWQError(f"{model_dir} has no model*.safetensors; export_gguf reads safetensors checkpoints only")
    missing = [p for p in parts if not (model_dir / p).is_file()]
    if missing:
        raise EWQError(f"{model_dir}: missing safetensors shard(s) {', '.join(missing)}")
    return [model_dir / p for p in parts]


SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def index_tensors(model_dir: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """HF name -> (file, dtype string, shape), in the order the converter meets them; reads headers only."""
    from safetensors import safe_open

    out = {}
    for part in safetensors_parts(model_dir):
        with safe_open(part, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open is not iterable
                if name.endswith(SKIP_SUFFIXES):
                    continue
                sl = f.get_slice(name)
                out[name] = (part, sl.get_dtype(), tuple(sl.get_shape()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# tokenizer

# convert_hf_to_gguf.get_vocab_base_pre: this text, encoded by the checkpoint's tokenizer, sha256 of str(ids)
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# The entries of the converter's hash table (llama.cpp vendored in llama_cpp_python 0.3.36) for tokenizers that
# llama / mistral / qwen2 checkpoints ship. The names are llama.cpp's LLAMA_VOCAB_PRE_TYPE spellings.
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",         # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",         # abacusai/Smaug-Llama-3-70B-Instruct
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",      # deepseek-ai/deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",    # deepseek-ai/deepseek-coder-6.7b-base
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",           # tiiuae/Falcon3-7B-Base
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",            # HuggingFaceTB/SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",             # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",             # Qwen/Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",            # mistralai/Mistral-Nemo-Base-2407
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",        # sapienzanlp/Minerva-7B-base-v1.0
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",            # Infinigence/Megrez-3B-Instruct
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",          # trillionlabs/Trillion-7B-preview
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",            # LumiOpen/Viking-7B
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",        # ByteDance-Seed/Seed-Coder-8B-Base
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",           # skt/A.X-4.0
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",          # K-intelligence/Midm-2.0-Base-Instruct
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",             # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",             # evilfreelancer/ruGPT3XL
}


# The pre-tokenizer regexes of tokenizers' pipelines that llama.cpp implements under a name (src/llama-vocab.cpp)
QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def pre_tokenizer_by_structure(pipeline: dict) -> str | None:
    """The llama.cpp pre-tokenizer that does what this (serialized, effective) tokenizers pipeline does, if plain.

    gpt-2: one ByteLevel step with GPT-2's regex; smollm: individual digits, then that; qwen2 / llama-bpe: a
    Split on Qwen2's / Llama-3's regex, then a ByteLevel without regex. No prefix space, no normalizer but NFC
    (which llama.cpp does not apply either for qwen2, whose converter entry it is)."""
    norm = pipeline.get("normalizer")
    if norm and norm.get("type") != "NFC":
        return None
    pre = pipeline.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = steps or []
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space", False):
        return None
    regex = steps[-1].get("use_regex", True)
    head = steps[:-1]
    if regex and not norm:
        if not head:
            return "gpt-2"
        if len(head) == 1 and head[0].get("type") == "Digits" and head[0].get("individual_digits"):
            return "smollm"
        return None
    if not regex and len(head) == 1 and head[0].get("type") == "Split" and head[0].get("behavior") == "Isolated" \
            and not head[0].get("invert", False):
        pattern = (head[0].get("pattern") or {}).get("Regex")
        if pattern == QWEN2_RE:
            return "qwen2"
        if pattern == LLAMA3_RE and not norm:
            return "llama-bpe"
    return None


def pre_tokenizer_name(model_dir: Path, tokenizer=None, override: str | None = None) -> tuple[str, str, str]:
    """(name, how it was found: given / hash / structure, chkhsh), or one EWQError line."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if override:
        return override, "given", chkhsh
    if chkhsh in KNOWN_PRE:
        return KNOWN_PRE[chkhsh], "hash", chkhsh
    try:  # the pipeline transformers really runs (it may rebuild it per tokenizer class, e.g. Qwen2Tokenizer)
        pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    except (AttributeError, ValueError):
        pipeline = {}
    if (name := pre_tokenizer_by_structure(pipeline)) is not None:
        return name, "structure", chkhsh
    raise EWQError(f"{model_dir.name}: the tokenizer's BPE pre-tokenizer is not one llama.cpp's converter knows "
                   f"(chkhsh {chkhsh[:16]}...); pass pre_tokenizer='<llama.cpp name>' if you know which it is")


def check_tokenizer_files(model_dir: Path, gguf_arch: str) -> dict:
    """The converter's vocab choice, for the cases we write (byte-level BPE) and refuse (SentencePiece)."""
    if (model_dir / "tokenizer.model").is_file():
        raise EWQError(f"{model_dir.name} has a SentencePiece tokenizer (tokenizer.model); the GGUF export writes "
                       "byte-level BPE vocabularies only -- use llama.cpp's convert_hf_to_gguf.py for this model")
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise EWQError(f"{model_dir.name} has no tokenizer.json; the GGUF export needs the tokenizer to write the vocabulary")
    with open(path, encoding="utf-8") as f:
        tok_json = json.load(f)
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise EWQError(f"{model_dir.name}: tokenizer.json holds a {model.get('type')} model; the GGUF export writes BPE only")
    # LlamaModel.set_vocab tries gguf.LlamaHfVocab first: a byte-fallback BPE with a Sequence decoder is a
    # SentencePiece vocabulary stored as tokenizer.json (tokenizer model "llama"), which we do not write.
    is_llama3 = model.get("ignore_merges", False) and not model.get("byte_fallback", True)
    if gguf_arch == "llama" and not is_llama3 and model.get("byte_fallback", False) \
            and (tok_json.get("decoder") or {}).get("type") == "Sequence":
        raise EWQError(f"{model_dir.name}: tokenizer.json is a SentencePiece-style (byte-fallback) vocabulary; "
                       "the GGUF export writes byte-level BPE only -- use llama.cpp's convert_hf_to_gguf.py")
    return tok_json


def does_token_look_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    seems = token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
    seems = seems or (token.startswith("<|") and token.endswith("|>"))
    seems = seems or (token.startswith("<｜") and token.endswith("｜>"))
    return seems or (token.startswith("<unused") and token.endswith(">"))


def vocab_gpt2(model_dir: Path, vocab_size: int | None, pre_override: str | None = None):
    """TextModel.get_vocab_base: (tokens, token types, pre-tokenizer name, how it was found)."""
    gguf = _gguf()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.vocab
    vocab_size = vocab_size if vocab_size is not None else len(vocab)
    if max(vocab.values()) >= vocab_size:
        raise EWQError(f"{model_dir.name}: the tokenizer has ids up to {max(vocab.values())}, "
                       f"beyond the model's vocab_size {vocab_size}")
    pre, how, chkhsh = pre_tokenizer_name(model_dir, tokenizer, pre_override)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or does_token_look_special(token):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace(b"\xe2\x96\x81".decode("utf-8"), " ")
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, toktypes, pre, how, chkhsh


# ---------------------------------------------------------------------------------------------------------------
# the plan: which type each tensor is written in


def is_float_only(gguf_name: str, ndim: int) -> bool:
    """The converter writes these F32 whatever the outtype (prepare_tensors: 1-D, *_norm.weight, not *.weight)."""
    return ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")


def resolve_plan(entries: dict, tensor_types: dict, default_type: str | None, strict: bool,
                 model_name: str) -> tuple[dict, dict, list]:
    """Per HF name: the final type. Returns (plan, fallbacks {hf: (asked, used)}, warnings)."""
    asked = {}
    for name, t in (tensor_types or {}).items():
        asked[name] = normalize_type(t, f" for {name}")
    unknown = sorted(set(asked) - set(entries))
    if unknown:
        hint = ""
        if "lm_head.weight" in unknown and "model.embed_tokens.weight" in entries:
            hint = " (lm_head is tied to model.embed_tokens.weight here: llama.cpp uses token_embd as the output, type that one)"
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise EWQError(f"tensor_types names {len(unknown)} tensor(s) {model_name} does not have: "
                       f"{', '.join(unknown[:3])}{more}{hint}")
    default = normalize_type(default_type, " (default_type)") if default_type is not None else None
    plan, fallbacks, warnings, unplanned = {}, {}, [], []
    for name, e in entries.items():
        if e["float_only"]:
            if name in asked and asked[name] != "F32":
                raise EWQError(f"{name} is a 1-D / norm tensor; llama.cpp keeps it F32 (asked {asked[name]})")
            plan[name] = "F32"
            continue
        t = asked.get(name, default)
        if t is None:
            unplanned.append(name)
            continue
        ncols = e["shape"][-1]
        used = llama_quantize_fallback(t, ncols)
        if used != t:
            if strict:
                raise EWQError(f"{name}: rows of {ncols} are not a multiple of {block_size(t)}, as {t} needs")
            fallbacks[name] = (t, used)
        plan[name] = used
    groups = Counter((t, used, entries[name]["shape"][-1]) for name, (t, used) in fallbacks.items())
    if groups:
        warnings.append(f"{len(fallbacks)} matrix(es) have rows that do not fit their type's blocks; written as "
                        "llama-quantize's fallback does: " + ", ".join(
                            f"{t}->{used} x{n} (rows of {cols})" for (t, used, cols), n in sorted(groups.items())))
    if unplanned:
        more = f" and {len(unplanned) - 3} more" if len(unplanned) > 3 else ""
        raise EWQError(f"tensor_types misses {len(unplanned)} matrix(es) of {model_name} and there is no default_type: "
                       f"{', '.join(unplanned[:3])}{more}")
    return plan, fallbacks, warnings


def dominant_type(types_by_params: dict) -> str:
    return max(types_by_params.items(), key=lambda kv: kv[1])[0] if types_by_params else "F32"


# ---------------------------------------------------------------------------------------------------------------
# llama-quantize arguments


def _gguf_names(tensor_types: dict, arch: str, n_blocks: int | None) -> dict:
    gguf = _gguf()
    if n_blocks is None:
        ids = [int(m.group(1)) for k in tensor_types if (m := re.search(r"(?:layers|blk)\.(\d+)\.", k))]
        n_blocks = max(ids) + 1 if ids else 1
    member = next((m for m in gguf.MODEL_ARCH if gguf.MODEL_ARCH_NAMES[m] == arch), None)
    if member is None:
        raise EWQError(f"unknown gguf architecture '{arch}'")
    tmap = gguf.get_tensor_name_map(member, n_blocks)
    out = {}
    for name, t in tensor_types.items():
        g = name if name.startswith(("blk.", "token_embd", "output", "rope_freqs")) else \
            tmap.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise EWQError(f"cannot map tensor {name!r} to a llama.cpp name for arch {arch}")
        out[g] = normalize_type(t, f" for {name}")
    return out


def llama_quantize_args(tensor_types: dict, src: str | os.PathLike = "model-bf16.gguf",
                        dst: str | os.PathLike = "model-plan.gguf", *, arch: str = "llama",
                        n_blocks: int | None = None, base_type: str | None = None,
                        nthreads: int | None = None) -> list[str]:
    r"""Arguments (without the program name) for llama.cpp's llama-quantize to give each tensor its planned type.

    `tensor_types` maps HF names (or GGUF names) to final types; pass the whole plan -- export_gguf's result
    has it as "final_types" -- because llama-quantize gives every matrix not matched here `base_type`.
    Norms / 1-D tensors are never touched by llama-quantize and are skipped. Returns [] when the plan has
    no quantized type at all (nothing for llama-quantize to do). The input may be export_gguf's file (only
    its k-quant matrices change) or any 16/32-bit GGUF of the same model, e.g. convert_hf_to_gguf's
    `--outtype f16` output (then every quantized matrix is made by llama-quantize).

    What llama-quantize does with them (tools/quantize/quantize.cpp, src/llama-quant.cpp, this version):
      * `--tensor-type PATTERN=TYPE`: PATTERN is lower-cased, compiled as a std::regex (ECMAScript) and
        applied with regex_search (a substring match, hence our ^...$ anchors) to GGUF tensor names; the
        first pattern that matches wins; TYPE is a ggml type name compared case-insensitively. Patterns are
        only consulted when the positional type is a quantized type, and they still go through the
        row-length fallback (Q4_K -> Q5_0 etc.).
      * `--token-embedding-type T` / `--output-tensor-type T` decide token_embd.weight / output.weight before
        any pattern, and skip the fallback.
      * the positional type (`base_type`, default: the most common quantized type of the plan) is the
        type of every quantizable matrix no pattern matched, and general.file_type (Q4_K means Q4_K_M).
      * `--pure` turns off the Q4_K_M-style mixture rules for unmatched tensors (matched ones skip them
        anyway): with it, what is listed here is exactly what is written.
      * block tensors of one kind and type share one pattern, ^blk\.(3|10)\.ffn_down\.weight$; with
        `n_blocks` given (export_gguf gives it), a kind whose every block has one type is ^blk\.[0-9]+\....
      * a tensor whose target type equals its type in the input is copied. Requantizing an already
        quantized tensor (Q8_0 in the input -> anything else) fails unless `--allow-requantize` is
        given; we never emit it, since every quantized input tensor is pinned to its own type.
    """
    names = _gguf_names(tensor_types, arch, n_blocks)
    names = {g: t for g, t in names.items() if not (g.endswith("_norm.weight") or not g.endswith(".weight")
                                                    or g.startswith("rope_freqs"))}
    quantized = Counter(t for t in names.values() if t not in FLOAT_TYPES)
    if not quantized:
        return []
    base = normalize_type(base_type) if base_type else quantized.most_common(1)[0][0]
    if base in FLOAT_TYPES:
        raise EWQError("llama-quantize's positional type must be a quantized type, else it ignores --tensor-type")
    args = ["--pure"]
    if "token_embd.weight" in names:
        args += ["--token-embedding-type", GGML_NAMES[names.pop("token_embd.weight")]]
    if "output.weight" in names:
        args += ["--output-tensor-type", GGML_NAMES[names.pop("output.weight")]]
    groups = defaultdict(list)  # (tensor kind, type) -> block ids
    for g, t in names.items():
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", g)
        if m:
            groups[(m.group(2), t)].append(int(m.group(1)))
        else:
            args += ["--tensor-type", f"^{re.escape(g)}$={GGML_NAMES[t]}"]
    for (kind, t), ids in sorted(groups.items(), key=lambda kv: (kv[0][0], min(kv[1]))):
        # every block (only when n_blocks is known: a partial plan must not capture unlisted blocks)
        if n_blocks is not None and sorted(ids) == list(range(n_blocks)):
            ids = "[0-9]+"
        else:
            ids = str(ids[0]) if len(ids) == 1 else "(" + "|".join(str(i) for i in sorted(ids)) + ")"
        args += ["--tensor-type", f"^blk\\.{ids}\\.{re.escape(kind)}$={GGML_NAMES[t]}"]
    args += [str(src), str(dst), base.upper()]
    if nthreads:
        args.append(str(nthreads))
    return args


# ---------------------------------------------------------------------------------------------------------------
# writing


def _set_gguf_parameters(writer, hparams: dict, gguf_arch: str, block_count: int, ftype: int, warnings: list):
    """TextModel.set_gguf_parameters (+ LlamaModel's / Qwen2Model's additions) for dense llama / qwen2 checkpoints."""
    gguf = _gguf()
    writer.add_block_count(block_count)
    if (n_ctx := find_hparam(hparams, ["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                       "max_sequence_length", "model_max_length"])) is not None:
        writer.add_context_length(n_ctx)
    if (n_embd := find_hparam(hparams, ["hidden_size", "n_embd", "dim"])) is not None:
        writer.add_embedding_length(n_embd)
    if (n_ff := find_hparam(hparams, ["prefix_dense_intermediate_size", "dense_intermediate_size",
                                      "intermediate_size", "n_inner", "hidden_dim"])) is not None:
        writer.add_feed_forward_length(n_ff)
    if (n_head := find_hparam(hparams, ["num_attention_heads", "n_head", "n_heads"])) is not None:
        writer.add_head_count(n_head)
    if (n_head_kv := find_hparam(hparams, ["num_key_value_heads", "n_kv_heads"])) is not None:
        writer.add_head_count_kv(n_head_kv)
    if hparams.get("is_causal") is False:
        writer.add_causal_attention(False)
    rp_all = rope_parameters(hparams)
    rp = rp_all.get("full_attention", rp_all)
    if (rope_type := rp.get("rope_type")) is not None:
        factor = rp.get("factor")
        if rope_type == "linear" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(factor)
            writer.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
            if (v := rp.get("extrapolation_factor")) is not None:
                writer.add_rope_scaling_yarn_ext_factor(v)
            if (v := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
                writer.add_rope_scaling_yarn_attn_factor(v)
            if (v := rp.get("beta_fast")) is not None:
                writer.add_rope_scaling_yarn_beta_fast(v)
            if (v := rp.get("beta_slow")) is not None:
                writer.add_rope_scaling_yarn_beta_slow(v)
        elif rope_type in ("su", "longrope"):
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        elif rope_type == "dynamic" or rope_type.lower() in ("llama3", "default"):
            pass  # llama3: the rope_freqs tensor; default: nothing to write
        else:
            warnings.append(f"unknown RoPE type {rope_type!r}: written without rope scaling, as llama.cpp's converter does")
    if (theta := rp.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (local := rp_all.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(local)
    if (eps := find_hparam(hparams, ["rms_norm_eps", "norm_eps"])) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := find_hparam(hparams, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        writer.add_layer_norm_eps(eps)
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    if gguf_arch == "llama":  # LlamaModel.set_gguf_parameters
        writer.add_vocab_size(hparams["vocab_size"])
        rope_dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
        writer.add_rope_dimension_count(rope_dim)


def llama3_rope_factors(hparams: dict):
    """LlamaModel.generate_extra_tensors: the rope_freqs tensor of rope_type 'llama3' (None otherwise)."""
    import math

    import torch

    rp_all = rope_parameters(hparams)
    rp = rp_all.get("full_attention", rp_all)
    if not rp or str(rp.get("rope_type", "")).lower() != "llama3":
        return None
    base = rp.get("rope_theta", 10000.0)
    dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _to_bytes(out, nbytes: int, name: str) -> np.ndarray:
    if hasattr(out, "numpy") and not isinstance(out, np.ndarray):
        out = out.cpu().numpy()
    arr = np.frombuffer(out, dtype=np.uint8) if isinstance(out, (bytes, bytearray, memoryview)) else \
        np.ascontiguousarray(out).view(np.uint8).reshape(-1)
    if arr.size != nbytes:
        raise EWQError(f"quantize_fn returned {arr.size} bytes for a slab of {name}, expected {nbytes}")
    return arr


def _write_tensor(fout, data, written_type: str, name: str, quantize_fn, progress_bar, importance=None) -> int:
    """Convert / quantize `data` (torch, [rows, cols] or 1-D) in slabs of rows; returns bytes written. With
    `importance` (float32 [cols]) the type is rounded as llama-quantize --imatrix does (ewq.ggml_quants)."""
    import torch

    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[written_type]
    arr2 = data.reshape(-1, data.shape[-1]) if data.dim() > 1 else data.reshape(1, -1)
    rows, cols = arr2.shape
    per_slab = max(1, SLAB_BYTES // (4 * cols))
    total = 0
    for r0 in range(0, rows, per_slab):
        slab = arr2[r0:r0 + per_slab]
        if importance is not None:
            from .ggml_quants import quantize_to_bytes

            buf = quantize_to_bytes(slab.to(torch.float32), written_type, importance=importance).reshape(-1)
        elif written_type in NUMPY_TYPES:
            # the converter: float16 / float32 kept, anything else (bf16) through float32, then gguf.quants
            if slab.dtype not in (torch.float16, torch.float32):
                slab = slab.to(torch.float32)
            out = gguf.quants.quantize(slab.numpy(), qtype)
            buf = np.ascontiguousarray(out).view(np.uint8).reshape(-1)
        else:
            if quantize_fn is None:
                raise AssertionError("k-quant tensors need quantize_fn")  # resolve_plan routes them elsewhere
            buf = _to_bytes(quantize_fn(slab.to(torch.float32), written_type),
                            slab.shape[0] * row_bytes(written_type, cols), name)
        buf.tofile(fout)
        total += buf.size
        if progress_bar is not None:
            progress_bar.update(buf.size)
    return total


def export_gguf(model_dir, out_path, tensor_types: dict | None = None, default_type: str | None = "BF16",
                progress: bool = True, *, kquant_intermediate: str = "auto", quantize_fn: Callable | None = None,
                strict: bool = False, pre_tokenizer: str | None = None, model_name: str | None = None,
                importance: dict | None = None, imatrix_metadata: dict | None = None,
                rounded: dict | None = None) -> dict:
    """Write `out_path` (GGUF) from the safetensors checkpoint `model_dir`, each matrix in its planned type.

    tensor_types: HF tensor name -> ggml type (see TYPES); matrices not named get default_type (None: all
        must be named). Names the checkpoint does not have are an error.
    kquant_intermediate: what k-quant matrices are written as when there is no quantize_fn: "auto" (the
        checkpoint's own 16-bit type, F32 for fp32 weights: lossless), "F16", "BF16" or "F32".
    quantize_fn: optional fn(weight float32 [rows, cols], type) -> bytes for types gguf-py cannot quantize.
    strict: refuse a matrix whose rows do not fit its type's block instead of falling back as llama-quantize does.
    pre_tokenizer: force tokenizer.ggml.pre (else found from the tokenizer's hash, see the module doc).
    importance: {GGUF tensor name: float32 [cols]} (ewq.imatrix): every matrix named there whose type reads an
        importance (all quantized types but Q8_0) is rounded as llama-quantize --imatrix rounds it; others as without.
        Needs quantize_fn (the types are written here, not left to llama-quantize).
    imatrix_metadata: key-values written into the file, llama-quantize's quantize.imatrix.* (Imatrix.gguf_metadata).
    rounded: {GGUF tensor name: .npy file of its bytes in its written type, uint8 [rows, row bytes]}: written as they
        are (ewq.gptq's rounding, in llama.cpp's layout).

    Returns a dict: path, arch, bytes, pre_tokenizer (+ how it was found), final_types {HF: type of the plan,
    after fallbacks}, written_types {HF: type in the file}, gguf_names {HF: GGUF}, fallbacks, warnings,
    pending_kquants {HF: type} still to be made by llama-quantize, llama_quantize_args (list, [] if none),
    llama_quantize_command (a shell line, "" if none).
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not model_dir.is_dir():
        raise EWQError(f"model directory {model_dir} does not exist")
    hparams = load_hparams(model_dir)
    hf_arch, gguf_arch, permute = detect_arch(model_dir, hparams)
    if out_path.is_dir():
        raise EWQError(f"output {out_path} is a directory; give the .gguf file's path")
    inter = kquant_intermediate.upper()
    if inter not in ("AUTO",) + FLOAT_TYPES:
        raise EWQError(f"kquant_intermediate must be auto, F16, BF16 or F32, not {kquant_intermediate!r}")

    # prove the output directory takes a file before reading any weight
    out_dir = out_path.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix="." + out_path.name + ".", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise EWQError(f"cannot write the GGUF file to {out_dir}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    warnings: list[str] = []
    try:
        if importance is not None and quantize_fn is None:
            raise EWQError("rounding with an importance matrix is done here: it needs quantize_fn (not "
                           "--llama-quantize-args; give llama-quantize the --imatrix file instead)")
        result = _export(model_dir, out_path, tmp, hparams, hf_arch, gguf_arch, permute, tensor_types,
                         default_type, progress, inter, quantize_fn, strict, pre_tokenizer, model_name, warnings,
                         importance or {}, imatrix_metadata or {}, rounded or {})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _export(model_dir, out_path, tmp, hparams, hf_arch, gguf_arch, permute, tensor_types, default_type, progress,
            inter, quantize_fn, strict, pre_override, model_name, warnings, importance, imatrix_metadata,
            rounded) -> dict:
    gguf = _gguf()
    block_count = find_hparam(hparams, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"], optional=False)
    heads = _heads(hparams, permute)
    entries = _checkpoint_entries(model_dir, gguf_arch, block_count)
    plan, fallbacks, fb_warnings = resolve_plan(entries, tensor_types, default_type, strict, model_dir.name)
    warnings += fb_warnings
    inter, written, pending = _written_types(entries, plan, inter, quantize_fn)
    ftype = _file_type(entries, written)

    writer = gguf.GGUFWriter(path=None, arch=gguf_arch)
    extra = llama3_rope_factors(hparams) if gguf_arch == "llama" else None
    order = _add_tensor_infos(writer, entries, written, extra)
    _add_metadata(writer, model_dir, model_name, hparams, gguf_arch, block_count, ftype, warnings)
    pre, pre_how, chkhsh = _add_vocab(writer, model_dir, hparams, gguf_arch, pre_override, warnings)
    used = _importance_used(entries, written, importance)
    for key, value in imatrix_metadata.items() if used else ():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)  # as llama-quant.cpp
    for w in warnings:
        sys.stderr.write(f"warning: {w}\n")
    _write_file(writer, tmp, order, entries, extra, heads, quantize_fn, progress, used, rounded)

    args = _llama_quantize_rest(entries, plan, pending, out_path, gguf_arch, block_count)
    if args and progress:
        sys.stderr.write(f"{len(pending)} k-quant matrix(es) written as {inter}; finish with:\n"
                         f"  llama-quantize {shlex.join(args)}\n")
    return {
        "path": str(out_path), "arch": gguf_arch, "hf_arch": hf_arch, "bytes": tmp.stat().st_size,
        "n_tensors": len(order), "file_type": ftype.name,
        "pre_tokenizer": pre, "pre_tokenizer_source": pre_how, "pre_tokenizer_hash": chkhsh,
        "final_types": plan, "written_types": written, "gguf_names": {n: e["gguf"] for n, e in entries.items()},
        "fallbacks": fallbacks, "warnings": warnings, "pending_kquants": pending, "kquant_intermediate": inter,
        "llama_quantize_args": args, "llama_quantize_command": ("llama-quantize " + shlex.join(args)) if args else "",
        "imatrix_tensors": sorted(used), "imatrix_metadata": imatrix_metadata if used else {},
        "rounded_tensors": sorted(rounded),
    }


def _importance_used(entries: dict, written: dict, importance: dict) -> dict:
    """{GGUF name: importance} of the matrices whose written type reads it (llama-quantize: any tensor the imatrix
    names, with exactly ne0 values; Q8_0 and the float types ignore it)."""
    from .ggml_quants import uses_importance

    used = {}
    for name, e in entries.items():
        imp = importance.get(e["gguf"])
        if imp is None or e["float_only"] or written[name] in FLOAT_TYPES or not uses_importance(written[name]):
            continue
        if len(imp) != e["shape"][-1]:
            raise EWQError(f"the importance of {e['gguf']} has {len(imp)} values, its rows {e['shape'][-1]}: an "
                           f"importance matrix of another model")
        used[e["gguf"]] = imp
    unweighted = {e["gguf"]: written[name] for name, e in entries.items()
                  if written[name] in NEEDS_IMPORTANCE and e["gguf"] not in used}
    if unweighted:
        first = ", ".join(f"{n} ({t})" for n, t in list(unweighted.items())[:2])
        more = f" and {len(unweighted) - 2} more" if len(unweighted) > 2 else ""
        raise EWQError(f"{first}{more}: ggml rounds that type only with an importance matrix, and the importance "
                       f"has no entry for it; give an importance matrix that covers it, or plan another type there")
    return used


def tensor_names(model_dir) -> dict:
    """{checkpoint tensor name: llama.cpp (GGUF) tensor name} of a checkpoint this module can write."""
    entries = _entries_of(Path(model_dir))
    return {name: e["gguf"] for name, e in entries.items()}


def tensor_shapes(model_dir) -> dict:
    """{GGUF name: shape as the checkpoint stores it ([rows, cols], cols = ggml's ne0)} of every matrix."""
    return {e["gguf"]: tuple(e["shape"]) for e in _entries_of(Path(model_dir)).values() if not e["float_only"]}


def _entries_of(model_dir: Path) -> dict:
    hparams = load_hparams(model_dir)
    _, gguf_arch, _ = detect_arch(model_dir, hparams)
    block_count = find_hparam(hparams, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"], optional=False)
    return _checkpoint_entries(model_dir, gguf_arch, block_count)


def _checkpoint_entries(model_dir: Path, gguf_arch: str, block_count: int) -> dict:
    """What the checkpoint holds, mapped to llama.cpp's names (headers only): HF name -> part, dtype, shape, gguf
    name, float_only."""
    gguf = _gguf()
    arch_enum = next(m for m in gguf.MODEL_ARCH if gguf.MODEL_ARCH_NAMES[m] == gguf_arch)
    tmap = gguf.get_tensor_name_map(arch_enum, block_count)
    entries = {}
    for name, (part, dtype, shape) in index_tensors(model_dir).items():
        gname = tmap.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise EWQError(f"{model_dir.name}: tensor {name!r} has no llama.cpp name for arch {gguf_arch}; "
                           "this checkpoint is not a plain causal LM of that layout")
        entries[name] = {"part": part, "dtype": dtype, "shape": shape, "gguf": gname,
                         "float_only": is_float_only(gname, len(shape))}
    return entries


def _written_types(entries: dict, plan: dict, inter: str, quantize_fn) -> tuple[str, dict, dict]:
    """(intermediate type, {HF: type written now}, {HF: k-quant pending}): k-quants wait for llama-quantize, written
    in `inter` (AUTO: the checkpoint's own 16-bit type, else F32), unless quantize_fn makes them."""
    src_dtypes = Counter(e["dtype"] for e in entries.values() if not e["float_only"])
    if inter == "AUTO":
        src = src_dtypes.most_common(1)[0][0] if src_dtypes else "F16"
        inter = {"F16": "F16", "BF16": "BF16"}.get(src, "F32")
    written, pending = {}, {}
    for name, t in plan.items():
        if t in KQUANT_TYPES and quantize_fn is None:
            written[name], pending[name] = inter, t
        else:
            written[name] = t
    return inter, written, pending


def _params_by_type(entries: dict, types: dict, skip=()) -> Counter:
    """Parameters of the matrices (not the float-only tensors) by their type in `types`, leaving out `skip`."""
    by_params = Counter()
    for name, t in types.items():
        if not entries[name]["float_only"] and t not in skip:
            by_params[t] += int(np.prod(entries[name]["shape"]))
    return by_params


def _file_type(entries: dict, written: dict):
    """general.file_type: the type holding most parameters among the matrices (as written)."""
    gguf = _gguf()
    return gguf.LlamaFileType[FILE_TYPES[dominant_type(_params_by_type(entries, written))]]


def _add_tensor_infos(writer, entries: dict, written: dict, extra) -> list:
    """Declare every tensor (llama3's rope factors `extra` first) in its written type; returns the write order:
    (gguf name, HF name or None, written type, nbytes)."""
    gguf = _gguf()
    order = []
    if extra is not None:
        gname = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        order.append((gname, None, "F32", extra.numel() * 4))
        writer.add_tensor_info(gname, tuple(extra.shape), np.dtype(np.float32), extra.numel() * 4,
                               raw_dtype=gguf.GGMLQuantizationType.F32)
    for name, e in entries.items():
        t, shape = written[name], e["shape"]
        nrows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        nbytes = nrows * row_bytes(t, shape[-1])
        writer.add_tensor_info(e["gguf"], shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType[t])
        order.append((e["gguf"], name, t, nbytes))
    return order


def _add_metadata(writer, model_dir: Path, model_name, hparams: dict, gguf_arch: str, block_count: int, ftype,
                  warnings: list) -> None:
    """The general.* keys and the hyper-parameters, as ModelBase.prepare_metadata + TextModel.prepare_metadata order
    them (after the tensor infos: the parameter count comes from them)."""
    gguf = _gguf()
    total_params, shared, expert, expert_count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, model_name, total_params)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    _set_gguf_parameters(writer, hparams, gguf_arch, block_count, ftype, warnings)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, model_dir: Path, hparams: dict, gguf_arch: str, pre_override, warnings: list) -> tuple:
    """The vocabulary (LlamaModel.set_vocab / Qwen2Model.set_vocab -> _set_vocab_gpt2); returns (pre-tokenizer, how
    it was found, the tokenizer's hash)."""
    gguf = _gguf()
    check_tokenizer_files(model_dir, gguf_arch)
    add_prefix_space = None
    if gguf_arch == "llama" and (model_dir / "tokenizer_config.json").is_file():
        with open(model_dir / "tokenizer_config.json", encoding="utf-8") as f:
            add_prefix_space = json.load(f).get("add_prefix_space")
        if add_prefix_space is not None:
            writer.add_add_space_prefix(add_prefix_space)
    tokens, toktypes, pre, pre_how, chkhsh = vocab_gpt2(model_dir, hparams.get("vocab_size"), pre_override)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    if gguf.Keys.Tokenizer.MERGES not in writer.kv_data[0]:
        warnings.append("the tokenizer has no BPE merges: gguf-py cannot write an empty tokenizer.ggml.merges and "
                        "llama.cpp refuses a gpt2 vocabulary without it, so llama.cpp will not load this file")
    if gguf_arch == "llama" and hparams.get("vocab_size", 32000) == 49152:
        writer.add_add_bos_token(False)  # LlamaModel.set_vocab: "granite small models" (SmolLM has this size too)
    return pre, pre_how, chkhsh


def _write_file(writer, tmp: Path, order: list, entries: dict, extra, heads, quantize_fn, progress: bool,
                importance: dict, rounded: dict) -> None:
    """Header, key-values, tensor infos; then the data, one tensor at a time, one safetensors file open at a time.
    heads: (n_head, n_kv_head) where q and k are permuted to llama.cpp's rotary layout, else None."""
    from safetensors import safe_open
    from tqdm import tqdm

    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    bar = tqdm(total=sum(o[3] for o in order), unit="B", unit_scale=True, desc="gguf export",
               disable=not progress, leave=False)
    part, f = None, None
    try:
        for gname, name, t, nbytes in order:
            if gname in rounded:  # rounded already (ewq.gptq), in this type and layout: its bytes as they are
                data = np.load(rounded[gname], mmap_mode="r")
                np.ascontiguousarray(data).reshape(-1).tofile(fout)
                n = data.nbytes
                bar.update(n)
            else:
                if name is None:
                    data = extra
                else:
                    if entries[name]["part"] != part:
                        part, f = entries[name]["part"], safe_open(entries[name]["part"], framework="pt")
                    data = _source_tensor(f, name, heads)
                n = _write_tensor(fout, data, t, gname, quantize_fn, bar, importance.get(gname))
            if n != nbytes:
                raise EWQError(f"{gname}: wrote {n} bytes, expected {nbytes}")
            writer.write_padding(fout, n)
            del data
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        bar.close()
        f = None
        writer.close()


def _source_tensor(f, name: str, heads):
    """The checkpoint's tensor `name` from the open safetensors file `f`, as a float, in llama.cpp's layout."""
    import torch

    data = f.get_tensor(name)
    if data.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        data = data.to(torch.float32)
    return _in_layout(name, data, heads)


def llama_layout(model_dir):
    """fn(checkpoint name, tensor) -> the tensor as this exporter writes it (q and k rows permuted to llama.cpp's
    rotary layout where the architecture needs it; other tensors as they are)."""
    hparams = load_hparams(Path(model_dir))
    _, _, permute = detect_arch(Path(model_dir), hparams)
    heads = _heads(hparams, permute)
    return lambda name, data: _in_layout(name, data, heads)


def _heads(hparams: dict, permute: bool):
    """(n_head, n_kv_head) where q and k rows are permuted to llama.cpp's rotary layout, else None."""
    n_head = find_hparam(hparams, ["n_heads", "num_attention_heads"], optional=False)
    return (n_head, find_hparam(hparams, ["n_kv_heads", "num_key_value_heads"]) or n_head) if permute else None


def _in_layout(name: str, data, heads):
    if heads and name.endswith(("q_proj.weight", "q_proj.bias")):
        data = llama_permute(data, heads[0], heads[0])
    elif heads and name.endswith(("k_proj.weight", "k_proj.bias")):
        data = llama_permute(data, heads[0], heads[1])
    return data


def _llama_quantize_rest(entries: dict, plan: dict, pending: dict, out_path: Path, gguf_arch: str,
                         block_count: int) -> list:
    """llama-quantize's arguments that make the pending k-quants (the file becomes -plan.gguf); [] if none."""
    if not pending:
        return []
    final_gguf = {entries[n]["gguf"]: t for n, t in plan.items()}
    final_params = _params_by_type(entries, plan, skip=FLOAT_TYPES)
    return llama_quantize_args(final_gguf, out_path, out_path.with_name(out_path.stem + "-plan.gguf"),
                               arch=gguf_arch, n_blocks=block_count, base_type=dominant_type(final_params))
