"""Every cache and reused file is keyed by everything that changes its content (issue 28.1): saved models, the GGUFs
--backend llama.cpp reuses, the reference caches, the executor probe, the analysis, the read bandwidth. One test per
key: each setting that changes the content changes the name or key, and the same settings give the same one."""

import copy
import json
import os
from dataclasses import dataclass

import pytest
import torch

import benchmark
from ewq import analysis, embed, executor, probes, quality
from ewq.apply import apply_plan, load_model
from ewq.artifact import (
    artifact_name,
    content_key,
    gguf_name,
    load_quantized,
    plan_assignment,
    read_metadata,
    save_quantized,
)
from ewq.backends import QuantSettings
from ewq.checkpoint import open_checkpoint
from ewq.common import EWQError, run_cli
from ewq.export import tensor_types
from ewq.plan import builtin_plan, plan_hash
from ewq.source import ModelSource, load_tokenizer

PLAN = {"model": {"fingerprint": "f" * 32, "kind": "decoder"}, "method": {"name": "entropy", "k": 1.0},
        "blocks": [{"index": 0, "precision": "8-bit"}, {"index": 1, "precision": "4-bit"}]}

# every setting that changes a saved model's tensors, each away from the default (bitsandbytes, CPU, bfloat16)
VARIANTS = {
    "torchao": (QuantSettings("torchao"), torch.bfloat16, "cpu"),
    "torch-dynamic": (QuantSettings("torch-dynamic"), torch.bfloat16, "cpu"),
    "quant_type": (QuantSettings(quant_type="fp4"), torch.bfloat16, "cpu"),
    "double_quant": (QuantSettings(double_quant=True), torch.bfloat16, "cpu"),
    "threshold": (QuantSettings(threshold=3.0), torch.bfloat16, "cpu"),
    "group_size": (QuantSettings("torchao", group_size=128), torch.bfloat16, "cpu"),
    "int8_activations": (QuantSettings("torchao", int8_activations=True), torch.bfloat16, "cpu"),
    "weight_scales": (QuantSettings("torch-dynamic", weight_scales="channel"), torch.bfloat16, "cpu"),
    "act_bits": (QuantSettings("torch-dynamic", act_bits=8), torch.bfloat16, "cpu"),
    "outlier_channels": (QuantSettings("torch-dynamic", outlier_channels=4), torch.bfloat16, "cpu"),
    "dtype": (QuantSettings(), torch.float32, "cpu"),
    "device": (QuantSettings(), torch.bfloat16, "cuda"),
    "torchao on cuda": (QuantSettings("torchao"), torch.bfloat16, "cuda"),
}


def name(settings, dtype=torch.bfloat16, device="cpu", plan=PLAN):
    return artifact_name("org/Model", plan, settings, dtype, device)


def test_the_default_executor_keeps_the_older_name():
    assert name(QuantSettings()) == f"Model-{plan_hash(PLAN)}"
    encoder = {**PLAN, "model": {**PLAN["model"], "kind": "encoder"}}  # an encoder's CPU default is float32
    assert name(QuantSettings(), torch.float32, plan=encoder) == f"Model-{plan_hash(encoder)}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_that_changes_a_saved_model_changes_its_name(variant):
    settings, dtype, device = VARIANTS[variant]
    mine = name(settings, dtype, device)
    assert mine.startswith(f"Model-{plan_hash(PLAN)}-") and mine != name(QuantSettings())
    assert mine == name(copy.deepcopy(settings), dtype, device)  # the same settings, the same name
    others = [name(*v) for k, v in VARIANTS.items() if k != variant]
    assert mine not in others


def test_settings_an_executor_does_not_read_leave_its_name_alone():
    # QuantSettings.key() says what changes the numbers: bitsandbytes' options mean nothing to torchao, and back
    assert name(QuantSettings("torchao", quant_type="fp4", threshold=1.0)) == name(QuantSettings("torchao"))
    assert name(QuantSettings(group_size=128)) == name(QuantSettings())


def test_the_content_key_covers_the_plans_precisions():
    edited = copy.deepcopy(PLAN)
    edited["blocks"][1]["precision"] = "8-bit"
    assert plan_hash(edited) == plan_hash(PLAN)  # (the plan hash does not see an edit of the precisions)
    assert plan_assignment(edited) != plan_assignment(PLAN)
    assert content_key(edited, QuantSettings(), torch.bfloat16) != content_key(PLAN, QuantSettings(), torch.bfloat16)
    assert content_key(copy.deepcopy(PLAN), QuantSettings(), torch.bfloat16) == \
        content_key(PLAN, QuantSettings(), torch.bfloat16)


@pytest.fixture
def dynamic_gpt2(tiny_factory):
    """A tiny GPT-2 with blocks 0 and 2 in torch's dynamic int8 (quantizing it takes well under a second)."""
    model_dir = tiny_factory("gpt2")
    ckpt = open_checkpoint(model_dir)
    source = ModelSource(str(model_dir), model_dir)
    fp = analysis.fingerprint(ckpt, progress=False)
    plan = builtin_plan("uniform-8bit", source, ckpt, fp, raw_bits=32)
    plan["blocks"][1]["precision"] = "raw"
    settings = QuantSettings("torch-dynamic")
    model = load_model(model_dir, torch.float32)
    apply_plan(model, plan, settings, torch.float32, progress=False)
    return model, plan, source, fp, load_tokenizer(model_dir), settings


def test_a_save_is_reused_for_the_same_content_only(dynamic_gpt2, tmp_path):
    model, plan, source, fp, tokenizer, settings = dynamic_gpt2
    path, written = save_quantized(model, plan, source, fp, tokenizer, settings, torch.float32, tmp_path)
    assert written and path.name == artifact_name(source.id, plan, settings, torch.float32)
    assert save_quantized(model, plan, source, fp, tokenizer, settings, torch.float32, tmp_path) == (path, False)
    edited = copy.deepcopy(plan)
    edited["blocks"][1]["precision"] = "8-bit"  # an edited plan keeps its hash, so its name
    with pytest.raises(EWQError, match="the plan was edited since"):
        save_quantized(model, edited, source, fp, tokenizer, settings, torch.float32, tmp_path)


def test_an_older_save_under_the_default_name_is_not_taken_for_another_executors(dynamic_gpt2, tmp_path):
    """Before issue 28 every executor saved to <model>-<plan hash>, which now means bitsandbytes at its defaults."""
    model, plan, source, fp, tokenizer, settings = dynamic_gpt2
    path, _ = save_quantized(model, plan, source, fp, tokenizer, settings, torch.float32, tmp_path)
    legacy = tmp_path / artifact_name(source.id, plan, QuantSettings(), torch.bfloat16)
    path.rename(legacy)
    with pytest.raises(EWQError, match=r"backend torch-dynamic there, bitsandbytes now\).*move or delete it") as e:
        save_quantized(model, plan, source, fp, tokenizer, QuantSettings(), torch.bfloat16, tmp_path)
    assert "\n" not in str(e.value)


def test_saving_one_plan_with_two_executors_gives_two_models(tiny_encoder, tmp_path, capsys):
    """The bug of issue 28.1: --save with torch-dynamic, then with torchao, returned the torch-dynamic model."""
    model = str(tiny_encoder("bert"))
    common = ["--model", model, "--plan", "uniform-8bit", "--save", "--plans-dir", str(tmp_path / "qm"),
              "--out-dir", str(tmp_path / "res"), "--eval-sentences", "8", "--speed-sentences", "2", "--repeats", "1",
              "--no-progress"]
    saved = {}
    for backend in ("torch-dynamic", "torchao"):
        assert run_cli(benchmark.main, common + ["--backend", backend]) == 0
        out = capsys.readouterr().out
        assert "already saved" not in out
        saved[backend] = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("saved: "))
    assert saved["torch-dynamic"] != saved["torchao"]
    assert read_metadata(saved["torch-dynamic"])["method"] == "dynamic-ptq-int8"
    meta = read_metadata(saved["torchao"])
    assert meta["method"] == "ewq-torchao" and meta["executor"]["backend"] == "torchao"
    assert load_quantized(saved["torchao"], "encoder")[2]["method"] == "ewq-torchao"
    # the same again: the same directory, left as it was
    assert run_cli(benchmark.main, common + ["--backend", "torchao"]) == 0
    assert f"already saved (left as it was): {saved['torchao']}" in capsys.readouterr().out


def test_a_plans_gguf_is_named_by_the_type_of_every_tensor(tiny_factory):
    model_dir = tiny_factory("llama")
    ckpt = open_checkpoint(model_dir)
    source = ModelSource(str(model_dir), model_dir)
    plan = builtin_plan("uniform-8bit", source, ckpt, "f" * 32)
    plan["blocks"][1]["precision"] = "raw"
    first = gguf_name(source.id, plan, tensor_types(plan, ckpt))
    assert first == gguf_name(source.id, copy.deepcopy(plan), tensor_types(plan, ckpt)) and first.endswith(".gguf")
    edited = copy.deepcopy(plan)
    edited["blocks"][0]["matrices"] = {next(iter(edited["blocks"][0]["shapes"])): "4-bit"}  # one matrix edited
    assert gguf_name(source.id, edited, tensor_types(edited, ckpt)) != first
    bf16 = open_checkpoint(tiny_factory("llama", dtype=torch.bfloat16))  # raw tensors: BF16, not F16 (the weights'
    # fingerprint, so the plan hash, differs too; the name does not depend on that alone)
    assert gguf_name(source.id, plan, tensor_types(plan, bf16)) != first
    other_weights = {**plan, "model": {**plan["model"], "fingerprint": "e" * 32}}
    assert gguf_name(source.id, other_weights, tensor_types(other_weights, ckpt)) != first


@dataclass
class Corpus:
    name: str = "lee_background.cor"
    sha256: str = "a" * 64


def test_the_decoder_reference_key_covers_weights_text_windows_dtype_device_and_k():
    windows = torch.zeros(4, 256, dtype=torch.long)
    base = dict(fingerprint="f" * 32, corpus=Corpus(), windows=windows, dtype=torch.float32, device="cpu", top_k=256)
    path = quality.cache_path("c", quality.reference_key(**base))
    assert path == quality.cache_path("c", quality.reference_key(**copy.deepcopy(base)))
    for change in (dict(fingerprint="e" * 32), dict(corpus=Corpus(sha256="b" * 64)), dict(corpus=Corpus("x.txt")),
                   dict(windows=torch.zeros(5, 256)), dict(windows=torch.zeros(4, 128)), dict(dtype=torch.bfloat16),
                   dict(device="cuda:0"), dict(top_k=16)):
        assert quality.cache_path("c", quality.reference_key(**{**base, **change})) != path, change


def test_the_encoder_reference_key_covers_weights_sentences_pooling_length_dtype_and_device():
    @dataclass
    class Embedder:
        pooling: embed.Pooling
        max_length: int = 128

    sentences = ["One sentence here.", "Another one there."]
    base = dict(fingerprint="f" * 32, corpus=Corpus(), sentences=sentences, embedder=Embedder(embed.Pooling()),
                dtype=torch.float32, device="cpu")
    key = embed.reference_key(**base)
    assert key == embed.reference_key(**copy.deepcopy(base))
    for change in (dict(fingerprint="e" * 32), dict(corpus=Corpus(sha256="b" * 64)),
                   dict(sentences=sentences[:1]), dict(sentences=["One sentence here!", "Another one there."]),
                   dict(embedder=Embedder(embed.Pooling("cls"))), dict(embedder=Embedder(embed.Pooling(normalize=True))),
                   dict(embedder=Embedder(embed.Pooling(), 64)), dict(dtype=torch.bfloat16), dict(device="cuda")):
        assert embed.reference_key(**{**base, **change}) != key, change


def test_the_executor_probe_key_covers_shapes_dtypes_and_the_settings_measured(monkeypatch):
    layout = executor.Layout([(128, 128), (256, 128)], 4, "decoder")

    def key(layout=layout, dtype=torch.bfloat16):
        return executor.probe_key(layout, "cpu", lambda backend: dtype)

    assert key() == key()
    assert key(executor.Layout([(128, 128)], 4, "decoder")) != key()
    assert key(executor.Layout([(128, 128), (256, 128)], 4, "encoder")) != key()
    assert key(dtype=torch.float32) != key()
    assert key()["settings"]["torchao"]["group_size"] == 64

    @dataclass
    class OtherDefaults(QuantSettings):  # a default changed: the old timings were of another format
        group_size: int = 128

    before = key()
    monkeypatch.setattr(executor, "QuantSettings", OtherDefaults)
    assert key() != before


def test_the_analysis_cache_covers_the_files_and_the_definitions(tiny_copy, monkeypatch):
    model_dir = tiny_copy("llama")
    first = analysis.analyze(open_checkpoint(model_dir), progress=False)
    assert not first.from_cache
    assert analysis.analyze(open_checkpoint(model_dir), progress=False).from_cache
    monkeypatch.setattr(analysis, "DEFINITIONS", {**analysis.DEFINITIONS, "histogram_bins": 64})
    assert not analysis.analyze(open_checkpoint(model_dir), progress=False).from_cache
    monkeypatch.undo()
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the file rewritten
    again = analysis.analyze(open_checkpoint(model_dir), progress=False)
    assert not again.from_cache and again.fingerprint == first.fingerprint
    cached = json.loads(analysis._cache_path(open_checkpoint(model_dir)).read_text())
    assert cached["definitions"] == analysis.DEFINITIONS


def test_the_bandwidth_cache_keeps_one_measurement_per_device_and_thread_count(monkeypatch):
    path = probes.bandwidth_cache_path("cpu")
    assert path == probes.bandwidth_cache_path("cpu")
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert probes.bandwidth_cache_path("cpu") != path
    monkeypatch.setattr(probes, "device_name", lambda device: "another CPU")
    assert probes.bandwidth_key("cpu") == {"device_name": "another CPU", "threads": threads + 1}
