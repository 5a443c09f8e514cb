"""Checkpoints with a real model's shapes and random weights, and a byte-level tokenizer.

Valid for speed and memory measurements (the same tensors, the same kernels), not for quality.
Used by the GPU benchmark (Llama-3.1-8B shapes made on the GPU machine, which has no network), by
bench/plan_speed.py, and by the tests' tiny models.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

BLOCK_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def save_byte_tokenizer(directory) -> None:
    """Ids 0..255 are bytes, 256 is end-of-text; fits any vocabulary of 257 or more."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # sorted: alphabet() is a set, and its order (hence every token id) would change with the hash seed per process
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(directory)


def write_random_checkpoint(config: dict, directory, seed: int = 0, device: str = "cpu",
                            dtype=torch.float16, shard_bytes: float = 4e9) -> Path:
    """Every parameter of AutoModelForCausalLM(config), random, saved as sharded safetensors + config.json.

    Tensor names and shapes come from building the model on the meta device, so any architecture
    transformers knows works. Matrices ~ N(0, 0.02^2) with a spread that differs a little from block to
    block (as in trained models, so plans are not degenerate); norms are ones, biases zeros."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg.dtype = dtype
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    params = dict(skeleton.named_parameters())  # tied parameters appear once
    gen = torch.Generator(device=device).manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, p in params.items():
        if p.dim() >= 2:
            m = BLOCK_INDEX.search(name)
            std = 0.02 * (1 + 0.05 * (int(m.group(1)) % 7)) if m else 0.02
            t = (torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)
        else:
            t = torch.ones(p.shape, dtype=dtype, device=device) if "norm" in name or "ln" in name else \
                torch.zeros(p.shape, dtype=dtype, device=device)
        current[name] = t.cpu()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(directory)
    return directory
