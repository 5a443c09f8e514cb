"""Plan generation: entropy definitions, the rule, block discovery, the plan file, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from ewq.analysis import analyze
from ewq.checkpoint import open_checkpoint
from ewq.common import run_cli
from ewq.entropy import block_entropy, histogram_entropy, poc_histogram_entropy, softmax_entropy
from ewq.plan import load_plan
from ewq.planning import entropy_rule, make_plan

import main_cache_model


def reference_softmax_entropy(w: torch.Tensor) -> float:
    p = torch.softmax(w.double().ravel(), dim=0)
    return float(-(p * torch.log(p)).sum() / math.log(w.numel()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,scale", [((256, 128), 0.02), ((64, 640), 1.0), ((128, 192), 3e-4)])
def test_histogram_entropy_matches_numpy(dtype, shape, scale):
    torch.manual_seed(1)
    w = (torch.randn(shape) * scale + torch.rand(shape) * scale).to(dtype)
    assert histogram_entropy(w) == pytest.approx(poc_histogram_entropy(w), abs=1e-12)


def test_histogram_entropy_edge_cases():
    assert histogram_entropy(torch.zeros(64, 64, dtype=torch.float16)) == 0.0
    two = torch.tensor([[-1.0, 1.0] * 32] * 64, dtype=torch.float16)  # two equally full bins
    assert histogram_entropy(two) == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [0.02, 1.0, 8.0])
def test_softmax_entropy_matches_torch(scale):
    torch.manual_seed(2)
    w = (torch.randn(192, 128) * scale).to(torch.float16)
    assert softmax_entropy(w) == pytest.approx(reference_softmax_entropy(w), abs=1e-10)
    assert softmax_entropy(torch.zeros(64, 64)) == pytest.approx(1.0)  # uniform distribution: maximal


def test_block_entropy_is_parameter_weighted():
    assert block_entropy([1.0, 4.0], [300, 100]) == pytest.approx(1.75)


def test_rule_on_hand_made_entropies():
    precisions, stats = entropy_rule([3.0, 2.0, 1.0, 0.0, 4.0], 1.0)  # mu 2, sigma sqrt(2)
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(math.sqrt(2.0))
    assert precisions == ["raw", "raw", "8-bit", "4-bit", "raw"]  # 2 ties with mu -> raw
    # mu = 2, sigma = 1: ties with mu stay raw, ties with mu - k*sigma are 8-bit
    precisions, stats = entropy_rule([1.0, 1.0, 3.0, 3.0], 1.0)
    assert stats["mean"] == 2.0 and stats["std"] == 1.0
    assert precisions == ["8-bit", "8-bit", "raw", "raw"]
    assert entropy_rule([0.0, 1.0, 2.0, 3.0, 4.0], 0.5)[0] == ["4-bit", "4-bit", "raw", "raw", "raw"]
    # k = 0 leaves the 8-bit band empty: everything below mu is 4-bit
    assert entropy_rule([0.0, 1.0, 2.0, 3.0, 4.0], 0.0)[0] == ["4-bit", "4-bit", "raw", "raw", "raw"]


def test_rule_sigma_zero_keeps_everything_raw():
    precisions, stats = entropy_rule([0.1, 0.1, 0.1], 1.0)
    assert precisions == ["raw"] * 3 and stats["std"] == 0.0


@pytest.mark.parametrize("kind,prefix,blocks,rows", [
    ("llama", "model.layers", 4, 128 * 4 + 256 * 2 + 128),
    ("qwen2", "model.layers", 3, 128 * 4 + 256 * 2 + 128),
    ("gpt2", "transformer.h", 3, 3 * 128 + 128 + 4 * 128 + 128),
])
def test_block_discovery(tiny_factory, kind, prefix, blocks, rows):
    ckpt = open_checkpoint(tiny_factory(kind))
    assert ckpt.block_prefix == prefix and len(ckpt.blocks) == blocks
    b0 = ckpt.blocks[0]
    assert len(b0.matrices) == (7 if kind != "gpt2" else 4)
    assert all(len(t.shape) == 2 for t in b0.matrices)
    assert sum(ckpt.rows(t) for t in b0.matrices) == rows
    other = {t.name for t in ckpt.other}
    assert any("emb" in n or "wte" in n for n in other)  # embeddings reported, not in blocks
    assert not any(".layers." in n or ".h." in n for n in other)


def test_plan_file_contents_and_determinism(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    path1, plan1, reused1 = make_plan(str(model), out_dir=tmp_path / "a", progress=False)
    path2, plan2, reused2 = make_plan(str(model), out_dir=tmp_path / "b", progress=False)
    assert not reused1 and not reused2 and path1.name == path2.name
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "run"}
    assert json.dumps(strip(path1)) == json.dumps(strip(path2))  # byte for byte apart from timing
    assert plan1["schema_version"] == 1 and plan1["model"]["block_count"] == 4
    assert [b["index"] for b in plan1["blocks"]] == [0, 1, 2, 3]
    # blocks were scaled 0.5, 1.5, 2.5, 3.5 -> wider spread; all four precisions follow the rule
    hs = [b["entropy"] for b in plan1["blocks"]]
    mu, sigma = np.mean(hs), np.std(hs)
    for b in plan1["blocks"]:
        want = "raw" if b["entropy"] >= mu else "8-bit" if b["entropy"] >= mu - sigma else "4-bit"
        assert b["precision"] == want
    assert sum(plan1["counts"].values()) == 4
    s = plan1["size"]
    assert s["blocks_bytes_before"] == 2 * s["block_params"]
    assert s["avg_bits_per_weight"] == pytest.approx(8 * s["blocks_bytes_after"] / s["block_params"], rel=1e-4)
    # a second run reuses the existing plan unless forced
    assert make_plan(str(model), out_dir=tmp_path / "a", progress=False)[2] is True
    assert make_plan(str(model), out_dir=tmp_path / "a", progress=False, force=True)[2] is False
    # a different method setting is a different plan file
    assert make_plan(str(model), out_dir=tmp_path / "a", progress=False, k=0.5)[0] != path1


def test_fingerprint_changes_with_one_weight(tiny_copy):
    model = tiny_copy("llama")
    before = analyze(open_checkpoint(model), progress=False).fingerprint
    file = model / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.2.mlp.up_proj.weight"
    tensors[name][3, 7] += 0.25
    save_file(tensors, file, metadata={"format": "pt"})
    after = analyze(open_checkpoint(model), progress=False).fingerprint
    assert before != after


def test_sharded_checkpoint_gives_the_same_analysis(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_factory("llama")
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    a = analyze(open_checkpoint(src), progress=False)
    b = analyze(open_checkpoint(tmp_path), progress=False)
    assert a.fingerprint == b.fingerprint and a.block_entropies == b.block_entropies


def run_script(argv, capsys):
    code = run_cli(main_cache_model.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_summary_and_path_last(tiny_factory, tmp_path, capsys):
    code, out, _ = run_script(["--model", str(tiny_factory("gpt2")), "--out-dir", str(tmp_path),
                               "--entropy", "softmax", "--k", "0.65", "--no-progress"], capsys)
    assert code == 0
    last = out.strip().splitlines()[-1]
    plan = load_plan(last)
    assert plan["method"] == {"name": "entropy", "entropy": "softmax", "bins": None, "k": 0.65, "rule": plan["method"]["rule"]}
    assert "blocks     raw" in out and "avg bits" in out


def corrupt(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\xff" * 8 + b"not json")


def unknown_layout(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    renamed = {k.replace("model.layers.", "backbone.stack."): v for k, v in tensors.items()}
    save_file(renamed, model_dir / "model.safetensors", metadata={"format": "pt"})


def only_pickles(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"pickle")


@pytest.mark.parametrize("damage,args,message", [
    (None, ["--model", "/no/such/dir"], "does not exist"),
    ("empty", [], "is empty"),
    (corrupt, [], "corrupt header"),
    (unknown_layout, [], "unknown layout"),
    (only_pickles, [], "pickled weights"),
    (None, ["--entropy", "renyi"], "invalid choice"),
    (None, ["--k", "-0.5"], "non-negative"),
    ("unwritable", [], "cannot write to output directory"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tiny_copy, tmp_path, capsys, damage, args, message):
    model = tiny_copy("llama")
    out_dir = tmp_path / "plans"
    if damage == "empty":
        model = tmp_path / "empty"
        model.mkdir()
    elif damage == "unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        out_dir = blocker / "plans"  # cannot create a directory under a file (even as root)
    elif damage:
        damage(model)
    argv = ["--model", str(model), "--out-dir", str(out_dir), "--no-progress"] + args
    try:
        code, out, err = run_script(argv, capsys)
    except SystemExit as e:  # argparse errors exit directly
        code, (out, err) = e.code, capsys.readouterr()
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_hub_id_offline_names_id_cache_and_variable(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(REPO / "main_cache_model.py"), "--model", "nobody/no-such-model",
                        "--models-dir", str(tmp_path / "models"), "--out-dir", str(tmp_path / "plans")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err and "nobody/no-such-model" in err and "HF_HUB_OFFLINE" in err
    assert str((tmp_path / "models").resolve()) in err
    assert not (tmp_path / "plans").exists() or not any((tmp_path / "plans").iterdir())


def test_real_smollm2_plan(smollm2_dir, tmp_path):
    path, plan, _ = make_plan(str(smollm2_dir), out_dir=tmp_path, progress=False)
    assert plan["model"]["block_count"] == 30 and plan["model"]["architecture"] == "LlamaForCausalLM"
    assert all(b["params"] == 3538944 for b in plan["blocks"])
    c = plan["counts"]
    assert c["raw"] + c["8-bit"] + c["4-bit"] == 30 and c["4-bit"] >= 1 and c["raw"] >= 1
    # real weights: block entropies differ (unlike a uniform random init) and stay inside (0, 7] bits
    hs = [b["entropy"] for b in plan["blocks"]]
    assert 0 < min(hs) < max(hs) <= 7.0
    # embeddings are reported outside the blocks and the metadata says the base is not quantized
    assert "model.embed_tokens.weight" in plan["other"]["tensors"]
    assert json.loads((smollm2_dir / "metadata.json").read_text())["is_quantized"] is False


def test_analysis_cache_makes_reuse_instant_and_a_changed_file_changes_the_fingerprint(tiny_copy, tmp_path, monkeypatch):
    import os

    from ewq import analysis
    from ewq.checkpoint import open_checkpoint

    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    model = tiny_copy("llama")
    first = analysis.analyze(open_checkpoint(model), progress=False)
    again = analysis.analyze(open_checkpoint(model), progress=False)
    assert not first.from_cache and again.from_cache and again.seconds == 0.0
    assert again.fingerprint == first.fingerprint and again.block_entropies == first.block_entropies
    # change one weight in place, keeping the file's size: the write moves the mtime, so it is analysed again
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    changed = analysis.analyze(open_checkpoint(model), progress=False)
    assert not changed.from_cache and changed.fingerprint != first.fingerprint
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a touch alone re-analyses: same weights, same fingerprint
    touched = analysis.analyze(open_checkpoint(model), progress=False)
    assert not touched.from_cache and touched.fingerprint == changed.fingerprint
