"""Random-weight checkpoints with real shapes (the GPU benchmark's input) and the GPU script's dry run."""

import json
import os
import subprocess
import sys

import pytest
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


def run_gpu_script(tmp_path, *flags, in_process=True):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "bench/gpu.py"), "--config", str(config), "--device", "cpu",
                        "--work", str(tmp_path / "work"), "--out", str(out), "--max-new-tokens", "4", "--repeats", "1",
                        *(["--in-process"] if in_process else []), *flags], capture_output=True, text=True, env=env, cwd=tmp_path)
    return r, out


@pytest.mark.slow
def test_gpu_script_dry_run_on_the_cpu(tmp_path):
    """bench/gpu.py end to end with a tiny config on the CPU (the bitsandbytes set), so the GPU session only has
    to run it; the torchao sets run the same code path with another --backend."""
    r, out = run_gpu_script(tmp_path, "--set", "bnb")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "gpu_summary.json").read_text())
    assert summary["failed"] == [] and summary["skipped"] == [] and summary["bare_generate_tok_s"] > 0
    # the original, then the EWQ plan + uniform 8/4-bit with bitsandbytes, each against that original
    variants = summary["vs_original"]
    assert len(variants) == 4 and variants[next(iter(variants))]["decode_tok_s_ratio"] == 1.0
    assert all(v["decode_tok_s_ratio"] > 0 and 0 <= v["greedy_token_match"] <= 1 for v in variants.values())
    assert variants["uniform-4bit"]["weight_ratio"] < variants["uniform-8bit"]["weight_ratio"] < 1
    # the CUDA correctness check runs here on the CPU: a raw/8-bit/4-bit model saved, loaded, bit-identical logits
    check = summary["saved_and_loaded"]
    assert check["plan_counts"] == {"raw": 1, "8-bit": 1, "4-bit": 1} and check["logits_identical"] is True
    results = json.loads((out / "gpu_results.json").read_text())
    assert sum(n.startswith("original_benchmark_") for n in results) == 1
    assert sum(n.startswith("ewq_benchmark_") for n in results) == 3
    names = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("report_") for n in names) and len(names) <= 8  # the device returns at most 8 files


def test_gpu_script_out_of_time_still_writes_what_it_skipped(tmp_path):
    """A device call is cut at 10 minutes: steps that do not fit the budget are listed, not silently lost.
    The steps run as on the device, each in its own process killed at the deadline: in-process steps cannot be
    cut, so with them a step started just before the deadline would finish on a fast machine."""
    r, out = run_gpu_script(tmp_path, "--set", "torchao", "--budget-s", "2", in_process=False)
    summary = json.loads((out / "gpu_summary.json").read_text())
    not_run = {entry.split(":")[0] for entry in summary["skipped"]} | {f["step"] for f in summary["failed"]}
    assert {"original", "ewq", "uniform-8bit", "uniform-4bit"} <= not_run
    assert summary["vs_original"] == {} and json.loads((out / "gpu_results.json").read_text()) == {}
    assert r.returncode == (1 if summary["failed"] else 0)


def test_byte_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    save_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Xin chào — héllo"
    ids = tok(text).input_ids
    assert max(ids) < 256 and tok.decode(ids) == text
