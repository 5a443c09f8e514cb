"""Applying a plan and benchmarking like for like."""

import json

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import benchmark
import benchmark_original
from ewq.apply import QuantSettings, apply_plan, block_list, load_model, weight_bytes_by_precision
from ewq.common import run_cli
from ewq.planning import make_plan

from conftest import layer_error_probe

MIX = ["raw", "8-bit", "4-bit", "8-bit"]


def plan_with(model_dir, out_dir, precisions):
    """A real plan for `model_dir`, with precisions edited by hand as a user may do."""
    path, plan, _ = make_plan(str(model_dir), out_dir=out_dir, progress=False)
    for b, p in zip(plan["blocks"], precisions):
        b["precision"] = p
    path.write_text(json.dumps(plan))
    return path, plan


def layer_types(block):
    return {type(m) for m in block.modules() if isinstance(m, (nn.Linear, bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
            or type(m).__name__ == "Conv1D"}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_module_types_follow_the_plan(tiny_factory, tmp_path, kind):
    model_dir = tiny_factory(kind)
    precisions = MIX[: 4 if kind == "llama" else 3]
    _, plan = plan_with(model_dir, tmp_path, precisions)
    model = load_model(model_dir, torch.float32)
    apply_plan(model, plan, QuantSettings(), torch.float32, progress=False)
    want = {"raw": None, "8-bit": bnb.nn.Linear8bitLt, "4-bit": bnb.nn.Linear4bit}
    for block, p in zip(block_list(model, plan["model"]["block_prefix"]), precisions):
        types = layer_types(block)
        if p == "raw":
            assert types <= {nn.Linear} or {t.__name__ for t in types} == {"Conv1D"}
        else:
            assert types == {want[p]}, (p, types)
            assert not any(m.training for m in block.modules())
    # embeddings and lm_head are never quantized
    assert isinstance(model.get_output_embeddings(), nn.Linear) and type(model.get_output_embeddings()) is nn.Linear
    assert type(model.get_input_embeddings()) is nn.Embedding
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layers_stay_within_measured_tolerance(dtype):
    # Measured on this machine: relative output error ~0.8 % (int8), ~9 % (nf4), ~11 % (fp4).
    err, _ = layer_error_probe(dtype)
    e8, nf4, fp4 = err("8-bit", QuantSettings()), err("4-bit", QuantSettings(quant_type="nf4")), \
        err("4-bit", QuantSettings(quant_type="fp4"))
    assert 0 < e8 < 0.015
    assert 0.02 < nf4 < 0.12 and 0.02 < fp4 < 0.14
    assert e8 < nf4 < fp4


def test_weight_bytes_are_exact(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama")
    _, plan = plan_with(model_dir, tmp_path, MIX)
    model = load_model(model_dir, torch.float32)
    apply_plan(model, plan, QuantSettings(), torch.float32, progress=False)
    got = weight_bytes_by_precision(model, plan)
    blocks = plan["blocks"]
    # raw: fp32 here; 8-bit: int8 data + one fp32 scale per row; 4-bit: half a byte per weight + fp32 absmax
    # per 64 weights + the 16-entry fp32 code book of each of the 7 layers. Everything outside the block
    # matrices is "other": embeddings, lm_head, the final norm and each block's two RMSNorm weights (128 fp32 each).
    norms = 2 * 128 * 4
    assert got["raw"] == 4 * blocks[0]["params"]
    assert got["8-bit"] == sum(blocks[i]["params"] + 4 * blocks[i]["rows"] for i in (1, 3))
    assert got["4-bit"] == blocks[2]["params"] // 2 + 4 * blocks[2]["params"] // 64 + 7 * 16 * 4
    assert got["other"] == 4 * (2 * 320 * 128 + 128) + 4 * norms


def run_script(module, argv, capsys):
    code = run_cli(module.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def keys(d):
    """The schema of a result: nested key paths, values ignored."""
    if isinstance(d, dict):
        return {k: keys(v) for k, v in d.items()}
    if isinstance(d, list) and d and isinstance(d[0], dict):
        return [keys(d[0])]
    return None


FAST = ["--tasks", "math,translation", "--max-new-tokens", "5", "--repeats", "2", "--no-progress"]


def test_both_scripts_share_one_schema_and_exact_token_counts(tiny_factory, tmp_path, capsys):
    model_dir = tiny_factory("llama")
    plan_path, _ = plan_with(model_dir, tmp_path / "plans", MIX)
    out = tmp_path / "results"
    code, stdout, _ = run_script(benchmark, ["--model", str(model_dir), "--plan", str(plan_path), "--backend", "bitsandbytes",
                                             "--out-dir", str(out)] + FAST, capsys)
    assert code == 0
    ewq = json.loads(open(stdout.strip().splitlines()[-1]).read())
    code, stdout, _ = run_script(benchmark_original, ["--model", str(model_dir), "--out-dir", str(out), "--eager"] + FAST, capsys)
    assert code == 0
    orig_path = stdout.strip().splitlines()[-1]
    orig = json.loads(open(orig_path).read())
    assert "original_benchmark_" in orig_path and "decode tok/s" in stdout
    assert ewq["kind"] == "ewq" and orig["kind"] == "original" and orig["plan"] is None
    assert set(keys(ewq)) == set(keys(orig))
    for section in ("model", "environment", "memory", "speed", "settings"):
        assert set(keys(ewq)[section]) == set(keys(orig)[section])
    assert keys(ewq)["tests"] == keys(orig)["tests"]
    for r in (ewq, orig):
        assert len(r["tests"]) == 4 and {t["task"] for t in r["tests"]} == {"math", "translation"}
        assert all(t["new_tokens"] == 5 and len(t["token_ids"]) == 5 for t in r["tests"])
        assert r["speed"]["decode_tok_s_min"] <= r["speed"]["decode_tok_s_median"] <= r["speed"]["decode_tok_s_max"]
        assert r["model"]["fingerprint"] == ewq["model"]["fingerprint"]
    assert ewq["plan"]["counts"] == {"raw": 1, "8-bit": 2, "4-bit": 1}
    assert ewq["memory"]["weight_bytes"] < orig["memory"]["weight_bytes"]
    # a second run never overwrites the first
    code, stdout, _ = run_script(benchmark_original, ["--model", str(model_dir), "--out-dir", str(out), "--eager"] + FAST, capsys)
    assert stdout.strip().splitlines()[-1] != orig_path and len(list(out.glob("*.json"))) == 3


def test_torch_dynamic_backend(tiny_factory, tmp_path, capsys):
    model_dir = tiny_factory("gpt2")
    plan_path, plan = plan_with(model_dir, tmp_path, ["raw", "8-bit", "8-bit"])
    model = load_model(model_dir, torch.float32)
    apply_plan(model, plan, QuantSettings(backend="torch-dynamic"), torch.float32, progress=False)
    blocks = block_list(model, plan["model"]["block_prefix"])
    dyn = torch.ao.nn.quantized.dynamic.Linear
    assert not any(isinstance(m, dyn) for m in blocks[0].modules())
    assert sum(isinstance(m, dyn) for m in blocks[1].modules()) == 4  # c_attn, c_proj, c_fc, mlp c_proj
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    bytes_ = weight_bytes_by_precision(model, plan)
    # per block: int8 weights + fp32 biases (384+128+512+128) + a 16-byte scale/zero point per layer
    # (the two LayerNorms count as "other")
    per_block = plan["blocks"][1]["params"] + 4 * (384 + 128 + 512 + 128) + 4 * 16
    assert bytes_["8-bit"] == 2 * per_block
    code, stdout, _ = run_script(benchmark, ["--model", str(model_dir), "--plan", str(plan_path), "--backend",
                                             "torch-dynamic", "--out-dir", str(tmp_path / "r")] + FAST, capsys)
    result = json.loads(open(stdout.strip().splitlines()[-1]).read())
    assert code == 0 and result["environment"]["backend"] == "torch-dynamic" and result["environment"]["dtype"] == "float32"


def bad_plan(edit):
    def make(model_dir, tmp_path):
        path, plan = plan_with(model_dir, tmp_path / "plans", MIX)
        edit(plan)
        path.write_text(json.dumps(plan))
        return ["--plan", str(path)]
    return make


def other_model_plan(model_dir, tmp_path, factory):
    path, _ = plan_with(factory("llama", seed=1), tmp_path / "plans", MIX)
    return ["--plan", str(path)]


@pytest.mark.parametrize("case,message", [
    ("no-plan", "python main_cache_model.py --model"),
    ("other-model", "made for other weights"),
    ("bad-precision", "unknown precision '3-bit'"),
    ("bad-index", "out of range"),
    ("dynamic-4bit", "has no 4-bit"),
    ("cuda", "CUDA is not available"),
    ("zero-tokens", "--max-new-tokens must be at least 2"),
    ("oom", "out of memory: the weights need"),
    ("unknown-matrix", "names matrix 'self_attn.x_proj', which the model does not have"),
    ("matrices-not-object", "'matrices' must be an object"),
    ("torchao-group-size", "takes --group-size 32, 64, 128"),
    ("group-size-bnb", "--group-size applies to --backend torchao only"),
    ("compile-bnb", "--compile with --backend bitsandbytes"),
    ("max-memory-not-a-size", "--max-memory: '8 apples' is not a size"),
    ("max-memory-compile", "--compile with --device-map/--max-memory"),
    ("no-tokenizer", "no tokenizer in"),
    ("binary-eval-text", "is not UTF-8 text"),
    ("eval-text-folder", "is a folder"),
    ("nan-threshold", "--int8-threshold must be a finite number"),
    ("negative-repeats", "--repeats must be at least 1"),
    ("plan-is-folder", "is a folder"),
    ("blocks-not-list", "lacks model.block_count"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_factory, tmp_path, capsys, monkeypatch, case, message):
    model_dir = tiny_factory("llama")
    # the executor is named (a later --backend wins): these cases are about the input, not about the probe
    argv = ["--model", str(model_dir), "--out-dir", str(tmp_path / "results"), "--plans-dir", str(tmp_path / "none"),
            "--backend", "bitsandbytes"] + FAST
    if case == "other-model":
        argv += other_model_plan(model_dir, tmp_path, tiny_factory)
    elif case == "bad-precision":
        argv += bad_plan(lambda p: p["blocks"][1].update(precision="3-bit"))(model_dir, tmp_path)
    elif case == "bad-index":
        argv += bad_plan(lambda p: p["blocks"][3].update(index=9))(model_dir, tmp_path)
    elif case == "dynamic-4bit":
        argv += bad_plan(lambda p: None)(model_dir, tmp_path) + ["--backend", "torch-dynamic"]
    elif case == "cuda":
        argv += ["--device", "cuda"]
    elif case == "zero-tokens":
        argv += ["--max-new-tokens", "0"]
    elif case == "unknown-matrix":
        argv += bad_plan(lambda p: p["blocks"][1].update(matrices={"self_attn.x_proj": "4-bit"}))(model_dir, tmp_path)
    elif case == "matrices-not-object":
        argv += bad_plan(lambda p: p["blocks"][1].update(matrices=["self_attn.q_proj"]))(model_dir, tmp_path)
    elif case == "torchao-group-size":
        argv += ["--plan", "uniform-4bit", "--backend", "torchao", "--group-size", "256"]
    elif case == "group-size-bnb":
        argv += ["--plan", "uniform-4bit", "--backend", "bitsandbytes", "--group-size", "128"]
    elif case == "compile-bnb":
        argv += ["--plan", "uniform-8bit", "--backend", "bitsandbytes", "--compile"]
    elif case == "max-memory-not-a-size":
        argv += ["--plan", "uniform-8bit", "--max-memory", "8 apples"]
    elif case == "max-memory-compile":
        argv += ["--plan", "uniform-8bit", "--backend", "torchao", "--compile", "--max-memory", "1GB"]
    elif case == "no-tokenizer":
        import shutil

        bare = tmp_path / "bare"
        bare.mkdir()
        for f in model_dir.iterdir():
            if f.name in ("config.json", "model.safetensors"):
                shutil.copy(f, bare / f.name)
        argv[1] = str(bare)
        argv += ["--plan", "uniform-8bit"]
    elif case == "binary-eval-text":
        (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
        argv += ["--plan", "uniform-8bit", "--quality", "--eval-text", str(tmp_path / "blob.bin")]
    elif case == "eval-text-folder":
        argv += ["--plan", "uniform-8bit", "--quality", "--eval-text", str(tmp_path)]
    elif case == "nan-threshold":
        argv += ["--plan", "uniform-8bit", "--int8-threshold", "nan"]
    elif case == "negative-repeats":
        argv += ["--plan", "uniform-8bit", "--repeats", "-3"]
    elif case == "plan-is-folder":
        argv += ["--plan", str(tmp_path)]
    elif case == "blocks-not-list":
        argv += bad_plan(lambda p: p.update(blocks="all 4-bit"))(model_dir, tmp_path)
    elif case == "oom":
        import psutil

        class Tiny:
            available = 1000
        monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
        argv += ["--plan", "uniform-8bit"]
    if torch.cuda.is_available() and case == "cuda":
        pytest.skip("this machine has CUDA")
    code, out, err = run_script(benchmark, argv, capsys)
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
