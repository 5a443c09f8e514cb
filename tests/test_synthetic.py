"""Random-weight checkpoints with real shapes (the GPU benchmark's input) and the GPU script's dry run."""

import json
import os
import subprocess
import sys

import torch

from conftest import REPO
from ewq.checkpoint import open_checkpoint
from ewq.synthetic import save_byte_tokenizer, write_random_checkpoint

TINY_LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 320, "tie_word_embeddings": False}


def test_random_checkpoint_has_the_shapes_of_the_config_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    write_random_checkpoint(TINY_LLAMA, tmp_path, shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").exists()  # sharded, as big checkpoints are
    ckpt = open_checkpoint(tmp_path)
    # q, o: 128x128; k, v: 64x128 (one kv head of 64); gate, up, down: 128x256
    assert len(ckpt.blocks) == 3 and ckpt.blocks[0].params == 2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 256
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    w = model.model.layers[1].mlp.up_proj.weight
    assert w.dtype == torch.float16 and 0.015 < w.float().std().item() < 0.03
    assert torch.equal(model.model.norm.weight, torch.ones(128, dtype=torch.float16))


def test_gpu_script_dry_run_on_the_cpu(tmp_path):
    """bench/gpu.py end to end with a tiny config on the CPU, so the GPU session only has to run it."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "bench/gpu.py"), "--config", str(config), "--device", "cpu",
                        "--work", str(tmp_path / "work"), "--out", str(out), "--max-new-tokens", "4", "--repeats", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "gpu_summary.json").read_text())
    assert summary["bare_generate_fp16_tok_s"] > 0
    # eager set: the original, and the EWQ plan + uniform 8/4-bit with each of bitsandbytes and torchao
    variants = summary["vs_original"]
    assert len(variants) == 7 and sum(k.endswith("@torchao") for k in variants) == 3
    assert all(v["decode_tok_s_ratio"] > 0 and 0 <= v["greedy_token_match"] <= 1 for v in variants.values())
    results = json.loads((out / "gpu_results.json").read_text())
    assert sum(n.startswith("original_benchmark_") for n in results) == 1
    assert sum(n.startswith("ewq_benchmark_") for n in results) == 6
    names = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("report_") for n in names) and len(names) <= 8  # the device returns at most 8 files


def test_byte_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    save_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Xin chào — héllo"
    ids = tok(text).input_ids
    assert max(ids) < 256 and tok.decode(ids) == text
