"""Stage 1: what is in a safetensors checkpoint, read from headers only (no weights, no model built).

Finds the transformer blocks from tensor names and config.json. A block's *matrices* are its 2-D
weights (attention and MLP projections; GPT-2's Conv1D weights are 2-D too). Everything else
(embeddings, norms, biases, lm_head) is "other": reported, never quantized.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .common import EWQError

# Tensor-name layouts we know: (name of the family, regex with the block index as group 2).
BLOCK_LAYOUTS = [
    ("llama-like (Llama/Mistral/Qwen2/Qwen3/Gemma/Phi3)", re.compile(r"^(model\.layers)\.(\d+)\.(.+)$")),
    ("gpt2", re.compile(r"^(transformer\.h|h)\.(\d+)\.(.+)$")),
    ("gpt-neox", re.compile(r"^(gpt_neox\.layers)\.(\d+)\.(.+)$")),
    # encoders: BertModel saves `encoder.layer.N`, BertFor* `bert.encoder.layer.N`, (XLM-)RoBERTa `roberta.encoder...`
    ("bert-like encoder (BERT/RoBERTa/XLM-R)", re.compile(r"^((?:bert\.|roberta\.)?encoder\.layer)\.(\d+)\.(.+)$")),
]
ENCODER_LAYOUTS = {"bert-like encoder (BERT/RoBERTa/XLM-R)"}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Architectures whose projection weights are stored [in_features, out_features] (transformers' Conv1D).
CONV1D_MODEL_TYPES = {"gpt2"}


@dataclass
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Block:
    index: int
    matrices: list = field(default_factory=list)  # TensorInfo of 2-D weights, quantizable
    others: list = field(default_factory=list)    # norms, biases: stay as they are

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.matrices)


@dataclass
class Checkpoint:
    path: Path
    config: dict
    tensors: list          # every TensorInfo, sorted by name
    layout: str            # family name from BLOCK_LAYOUTS
    block_prefix: str      # e.g. "model.layers"
    blocks: list           # Block, by index
    other: list            # TensorInfo outside blocks (embeddings, final norm, lm_head)

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or [self.config.get("model_type", "unknown")])[0]

    @property
    def kind(self) -> str:
        """encoder (sentence embeddings, no generate) or decoder (causal LM): decides how a model is loaded and measured."""
        return "encoder" if self.layout in ENCODER_LAYOUTS else "decoder"

    @property
    def conv1d(self) -> bool:
        return self.config.get("model_type") in CONV1D_MODEL_TYPES

    def rows(self, t: TensorInfo) -> int:
        """Output features of a matrix (one 8-bit scale per row)."""
        return t.shape[1] if self.conv1d else t.shape[0]


def safetensors_files(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise EWQError(f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise EWQError(f"{index.name} names shards that are missing: {', '.join(missing[:3])}; "
                           f"the download is incomplete")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EWQError(f"no *.safetensors file in {path}")
    return files


def read_header(file: Path) -> dict:
    """The JSON header of one safetensors file: {name: {dtype, shape, data_offsets}}."""
    try:
        with open(file, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(size_bytes, "little")
            if n <= 0 or n > 100_000_000 or n + 8 > file.stat().st_size:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise EWQError(f"{file} is not a valid safetensors file (corrupt header: {e}); re-download or re-save it") from None
    header.pop("__metadata__", None)
    return header


def open_checkpoint(path) -> Checkpoint:
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EWQError(f"cannot read {path / 'config.json'}: {e}") from None
    tensors = []
    for file in safetensors_files(path):
        for name, meta in read_header(file).items():
            tensors.append(TensorInfo(name, file, meta["dtype"], tuple(meta["shape"])))
    tensors.sort(key=lambda t: t.name)
    if not tensors:
        raise EWQError(f"the checkpoint in {path} holds no tensors")

    for layout, pattern in BLOCK_LAYOUTS:
        hits = [(pattern.match(t.name), t) for t in tensors]
        if any(m for m, _ in hits):
            break
    else:
        looked_for = ", ".join(p.pattern for _, p in BLOCK_LAYOUTS)
        raise EWQError(f"unknown layout in {path}: no tensor name matches a transformer-block pattern "
                       f"({looked_for}); first tensors: {', '.join(t.name for t in tensors[:3])}")

    blocks, other, prefixes = {}, [], set()
    for m, t in hits:
        if not m:
            other.append(t)
            continue
        prefixes.add(m.group(1))
        block = blocks.setdefault(int(m.group(2)), Block(int(m.group(2))))
        # a model saved with torchao stores each quantized weight as its parts (<layer>._weight_qdata, ...)
        is_matrix = len(t.shape) == 2 and m.group(3).endswith("weight") or m.group(3).endswith("._weight_qdata")
        (block.matrices if is_matrix else block.others).append(t)
    indices = sorted(blocks)
    if indices != list(range(len(indices))):
        raise EWQError(f"block indices in {path} are not 0..N-1 (found {indices[:5]}...); the checkpoint is incomplete")
    expected = next((config[k] for k in LAYER_COUNT_KEYS if k in config), None)
    if expected is not None and expected != len(indices):
        raise EWQError(f"{path} holds {len(indices)} blocks but config.json says {expected}; "
                       f"the checkpoint is incomplete or does not belong to this config")
    if len(prefixes) != 1:
        raise EWQError(f"blocks appear under several prefixes {sorted(prefixes)} in {path}; cannot tell them apart")
    empty = [i for i in indices if not blocks[i].matrices]
    if empty:
        raise EWQError(f"blocks {empty[:5]} in {path} have no 2-D weight matrices; nothing to quantize")
    return Checkpoint(path, config, tensors, layout, prefixes.pop(), [blocks[i] for i in indices], other)
