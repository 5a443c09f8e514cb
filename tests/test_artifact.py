"""Saved quantized models: save -> load gives identical logits; metadata; status."""

import json
import re
import shutil

import pytest
import torch

import benchmark
from ewq import status
from ewq.apply import QuantSettings, apply_plan, load_model
from ewq.artifact import load_quantized, save_quantized
from ewq.common import EWQError, run_cli
from ewq.plan import load_plan, plan_hash
from ewq.planning import make_plan
from ewq.source import ModelSource

MIX = ["raw", "8-bit", "4-bit", "8-bit"]


def quantized(model_dir, plan, quant_type):
    model = load_model(model_dir, torch.float32)
    apply_plan(model, plan, QuantSettings(quant_type=quant_type), torch.float32, progress=False)
    return model


@pytest.fixture
def mixed_plan(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama")
    path, plan, _ = make_plan(str(model_dir), out_dir=tmp_path / "plans", progress=False)
    for b, p in zip(plan["blocks"], MIX):
        b["precision"] = p
    path.write_text(json.dumps(plan))
    return model_dir, load_plan(path)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("forward_first", [False, True])
def test_save_then_load_gives_identical_logits(mixed_plan, tmp_path, quant_type, forward_first):
    from transformers import AutoTokenizer

    model_dir, plan = mixed_plan
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    fresh = quantized(model_dir, plan, quant_type)
    if forward_first:  # the saved state must not depend on whether a forward ran before saving
        fresh(ids)
    settings = QuantSettings(quant_type=quant_type)
    source = ModelSource(str(model_dir), model_dir)
    path, written = save_quantized(fresh, plan, source, plan["model"]["fingerprint"],
                                   AutoTokenizer.from_pretrained(model_dir), settings, torch.float32, tmp_path / "q")
    assert written and f"-{plan_hash(plan)}-" in path.name  # (float32 is not the CPU default: a settings digest follows)
    loaded, loaded_plan, meta = load_quantized(path)
    with torch.no_grad():
        want = quantized(model_dir, plan, quant_type)(ids).logits
        assert torch.equal(loaded(ids).logits, want)
        assert torch.equal(fresh(ids).logits, want)
    assert loaded_plan["counts"] == {"raw": 1, "8-bit": 2, "4-bit": 1}
    assert meta["is_quantized"] is True and meta["method"] == "ewq-bitsandbytes"
    assert meta["base_fingerprint"] == plan["model"]["fingerprint"] and meta["quant_type"] == quant_type
    assert meta["counts"] == loaded_plan["counts"] and meta["weight_bytes"] > 0 and 4 < meta["avg_bits_per_weight"] < 32
    for field in ("base_model", "plan_hash", "tool_version", "created", "avg_bits_per_weight"):
        assert field in meta
    assert save_quantized(fresh, plan, source, plan["model"]["fingerprint"], None, settings, torch.float32,
                          tmp_path / "q")[1] is False  # an existing save is never overwritten


def test_torch_dynamic_models_save_as_dynamic_ptq_int8(tiny_factory, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_factory("gpt2")  # Conv1D layers become dynamic int8 Linear layers
    path, plan, _ = make_plan(str(model_dir), out_dir=tmp_path / "plans", progress=False)
    for b, p in zip(plan["blocks"], ["8-bit", "raw", "8-bit"]):
        b["precision"] = p
    path.write_text(json.dumps(plan))
    plan = load_plan(path)
    settings = QuantSettings(backend="torch-dynamic")
    model = load_model(model_dir, torch.float32)
    apply_plan(model, plan, settings, torch.float32, progress=False)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    saved_dir, _ = save_quantized(model, plan, ModelSource(str(model_dir), model_dir), plan["model"]["fingerprint"],
                                  AutoTokenizer.from_pretrained(model_dir), settings, torch.float32, tmp_path / "q")
    loaded, _, meta = load_quantized(saved_dir)
    assert meta["method"] == "dynamic-ptq-int8" and meta["is_quantized"] is True
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    dyn = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dyn) for m in loaded.modules()) == 8


def saved(mixed_plan, tmp_path):
    from transformers import AutoTokenizer

    model_dir, plan = mixed_plan
    model = quantized(model_dir, plan, "nf4")
    return save_quantized(model, plan, ModelSource(str(model_dir), model_dir), plan["model"]["fingerprint"],
                          AutoTokenizer.from_pretrained(model_dir), QuantSettings(), torch.float32, tmp_path)[0]


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]), "not a valid safetensors"),
    (lambda p: (p / "plan.json").write_text(json.dumps({**json.loads((p / "plan.json").read_text()),
                                                        "method": {"name": "other"}})), "not the plan"),
])
def test_damaged_saves_are_refused(mixed_plan, tmp_path, damage, message):
    path = saved(mixed_plan, tmp_path)
    damage(path)
    with pytest.raises(EWQError, match=message):
        load_quantized(path)


def test_benchmark_saves_and_loads_without_requantizing(tiny_factory, tmp_path, capsys):
    model_dir = tiny_factory("gpt2")
    fast = ["--tasks", "math", "--max-new-tokens", "4", "--repeats", "1", "--no-progress", "--out-dir", str(tmp_path / "r")]
    plans = str(tmp_path / "q")
    assert run_cli(benchmark.main, ["--model", str(model_dir), "--plan", "uniform-4bit", "--backend", "bitsandbytes", "--save",
                                    "--plans-dir", plans] + fast) == 0
    first = json.loads(open(capsys.readouterr().out.strip().splitlines()[-1]).read())
    saved_dir = first["load"]["saved_to"]
    assert first["load"]["path_taken"] == "quantized-from-checkpoint" and saved_dir
    assert run_cli(benchmark.main, ["--model", saved_dir] + fast) == 0
    second = json.loads(open(capsys.readouterr().out.strip().splitlines()[-1]).read())
    assert second["load"]["path_taken"] == "saved-quantized" and second["load"]["quantize_s"] == 0.0
    assert second["model"]["fingerprint"] == first["model"]["fingerprint"]
    assert [t["token_ids"] for t in second["tests"]] == [t["token_ids"] for t in first["tests"]]
    assert second["memory"]["weight_bytes"] == first["memory"]["weight_bytes"]
    # --compile is judged by the backend the saved model was made with, not by the --backend default
    assert run_cli(benchmark.main, ["--model", saved_dir, "--compile"] + fast) == 2
    assert "was saved with the bitsandbytes backend" in capsys.readouterr().err
    # executor flags are the saved model's (metadata.json): given again they are refused, not silently ignored
    assert run_cli(benchmark.main, ["--model", saved_dir, "--backend", "torchao", "--int8-threshold", "3"] + fast) == 2
    assert "drop --backend, --int8-threshold" in capsys.readouterr().err


def test_status_lists_every_model_and_flags_broken_ones(mixed_plan, tmp_path, capsys):
    model_dir, plan = mixed_plan
    models, plans = tmp_path / "models", tmp_path / "quantized_models"
    base = models / "tiny"
    shutil.copytree(model_dir, base)
    (base / "metadata.json").write_text(json.dumps({"is_quantized": False, "base_model": "tiny",
                                                    "fingerprint": plan["model"]["fingerprint"]}))
    shutil.copytree(model_dir, models / "no-metadata")
    shutil.copytree(model_dir, models / "broken")
    (models / "broken" / "metadata.json").write_text("{not json")
    plans.mkdir()
    (plans / "quant_plan_abc.json").write_text(json.dumps(plan))
    saved(mixed_plan, plans)
    rows = {r["name"]: r for r in status.status(models, plans, tmp_path / "results")}
    assert rows["tiny"]["is_quantized"] is False and rows["tiny"]["plans"] == ["quant_plan_abc.json"]
    assert rows["no-metadata"]["is_quantized"] == "unknown" and rows["no-metadata"]["problem"] == "no metadata.json"
    assert rows["broken"]["is_quantized"] == "unknown" and "broken metadata.json" in rows["broken"]["problem"]
    q = next(r for r in rows.values() if r["is_quantized"] is True)
    assert q["method"] == "ewq-bitsandbytes" and q["counts"] == {"raw": 1, "8-bit": 2, "4-bit": 1} and q["size_bytes"] > 0
    assert run_cli(status.main, ["--json", "--models-dir", str(models), "--plans-dir", str(plans)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema_version"] == 1 and len(data["models"]) == 4
    assert run_cli(status.main, ["--models-dir", str(models), "--plans-dir", str(plans)]) == 0
    assert "unknown" in capsys.readouterr().out
    # a mistyped folder is an error, not an empty listing
    assert run_cli(status.main, ["--models-dir", str(tmp_path / "modles"), "--plans-dir", str(plans)]) == 2
    assert "--models-dir" in capsys.readouterr().err


def torchao_saved(model_dir, plan, tmp_path, dtype=torch.bfloat16):
    from transformers import AutoTokenizer

    settings = QuantSettings(backend="torchao")
    model = load_model(model_dir, dtype)
    apply_plan(model, plan, settings, dtype, progress=False)
    path = save_quantized(model, plan, ModelSource(str(model_dir), model_dir), plan["model"]["fingerprint"],
                          AutoTokenizer.from_pretrained(model_dir), settings, dtype, tmp_path / "q")[0]
    return model, path


def test_torchao_saves_are_what_save_pretrained_writes(mixed_plan, tmp_path):
    """EWQ's torchao save is transformers' own layout: the tensors, header and quantization_config that save_pretrained
    writes for the same plan quantized by transformers while loading (TorchAoConfig)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model_dir, plan = mixed_plan
    plan["blocks"][2]["precision"] = "8-bit"  # int8 only: what transformers can save by itself
    _, ours = torchao_saved(model_dir, plan, tmp_path)
    config = json.loads((ours / "config.json").read_text())
    theirs = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=TorchAoConfig.from_dict(config["quantization_config"]), dtype=torch.bfloat16,
        device_map="cpu")
    theirs.save_pretrained(tmp_path / "hf")
    files = {}
    for name, path in (("ours", ours), ("theirs", tmp_path / "hf")):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            header = {k: json.loads(v) if k != "format" else v for k, v in (f.metadata() or {}).items()}
            files[name] = header, {k: f.get_tensor(k) for k in f.keys()}
    assert files["ours"][0] == files["theirs"][0]
    assert files["ours"][1].keys() == files["theirs"][1].keys()
    assert all(torch.equal(t, files["theirs"][1][k]) for k, t in files["ours"][1].items())
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field in ("quantization_config", "dtype", "architectures"):
        assert config[field] == hf_config[field], field


def test_a_torchao_that_cannot_read_a_save_is_refused_before_reading_it(mixed_plan, tmp_path, monkeypatch):
    import torchao.prototype.safetensors.safetensors_utils as torchao_safetensors

    from ewq import artifact

    model_dir, plan = mixed_plan
    _, path = torchao_saved(model_dir, plan, tmp_path)
    saved_with = json.loads((path / "metadata.json").read_text())["torchao_version"]
    monkeypatch.setattr(artifact, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    older = [c for c in torchao_safetensors.ALLOWED_TENSORS_SUBCLASSES if c != "Int8Tensor"]  # as before Int8Tensor
    with monkeypatch.context() as m:
        m.setattr(torchao_safetensors, "ALLOWED_TENSORS_SUBCLASSES", older)
        with pytest.raises(EWQError, match=rf"torchao \S+ cannot rebuild the Int8Tensor weights in .*; "
                                           rf"install torchao=={re.escape(saved_with)}") as refused:
            load_quantized(path)
    config = json.loads((path / "config.json").read_text())
    text = json.dumps(config).replace('"Int8WeightOnlyConfig"', '"Int8WeightOnlyConfigV9"')  # a config from elsewhere
    (path / "config.json").write_text(text)
    with pytest.raises(EWQError, match="cannot read the quantization_config in"):
        load_quantized(path)
    assert "\n" not in str(refused.value)


def test_gpt2_torchao_saves_load_with_ewq_only(tiny_factory, tmp_path):
    """GPT-2's Conv1D layers are nn.Linear once quantized, but transformers builds them as Conv1D: such a save carries
    no quantization_config (transformers cannot run it) and metadata.json says so; EWQ loads it as before."""
    model_dir = tiny_factory("gpt2")
    path, plan, _ = make_plan(str(model_dir), out_dir=tmp_path / "plans", progress=False)
    for b in plan["blocks"]:
        b["precision"] = "8-bit"
    path.write_text(json.dumps(plan))
    model, saved = torchao_saved(model_dir, load_plan(path), tmp_path)
    meta = json.loads((saved / "metadata.json").read_text())
    assert meta["hf_loadable"] is False and meta["hf_needs_import"] is None
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    loaded, _, _ = load_quantized(saved)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
