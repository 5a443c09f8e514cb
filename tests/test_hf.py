"""EWQ models that leave the tool: plans as transformers' quantization_config, saves that plain transformers loads
(CPU int4 after one `import ewq.hf`, on any CPU), and loading bigger-than-memory checkpoints block by block."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from ewq.apply import QuantSettings, apply_plan, load_for_plan, load_model
from ewq.artifact import check_fits, load_quantized, save_quantized
from ewq.common import EWQError
from ewq.hf import write_hf_config
from ewq.plan import load_plan, plan_hash
from ewq.planning import make_plan
from ewq.source import ModelSource

from conftest import REPO

AO = QuantSettings(backend="torchao")
IDS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]


def edited_plan(model_dir, out_dir, precisions, matrices=None):
    """A plan for the model's own weights with these block precisions (and per-matrix overrides {block: {...}})."""
    path, plan, _ = make_plan(str(model_dir), out_dir=out_dir, progress=False)
    for b, p in zip(plan["blocks"], precisions):
        b["precision"] = p
    for index, m in (matrices or {}).items():
        plan["blocks"][index]["matrices"] = m
    path.write_text(json.dumps(plan))
    return load_plan(path)


def ewq_model(model_dir, plan, dtype, kind="decoder", settings=AO):
    model = load_model(model_dir, dtype, kind)
    apply_plan(model, plan, settings, dtype, progress=False)
    return model


def output(model, kind="decoder"):
    with torch.no_grad():
        ids = torch.tensor(IDS)
        return model(ids).logits if kind == "decoder" else model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def weight_types(model) -> dict:
    return {n: type(m.weight).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def save(model, model_dir, plan, dtype, root):
    from transformers import AutoTokenizer

    return save_quantized(model, plan, ModelSource(str(model_dir), model_dir), plan["model"]["fingerprint"],
                          AutoTokenizer.from_pretrained(model_dir), AO, dtype, root)[0]


def run_python(code: str, cwd, ewq_importable: bool, env=None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last. Without ewq_importable neither the repository
    nor the test folder is on its path (cwd is a scratch folder), so `import ewq` would fail there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("PYTHONPATH", None)
    if ewq_importable:
        env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


RESULTS = """
    import json, torch
    from safetensors.torch import save_file
    def weight_types(m):
        return {n: type(x.weight).__name__ for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}
    def output(m, kind):
        ids = torch.tensor(IDS)
        with torch.no_grad():
            return (m(ids).logits if kind == "decoder" else
                    m(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state).contiguous()
"""


@pytest.fixture(scope="module")
def outside(tiny_factory, tiny_encoder, tmp_path_factory):
    """EWQ's models and plan configs, and what one fresh process makes of them: first int8 (a decoder, and an encoder
    whose checkpoint says `bert.encoder.layer.N`) with ewq not importable at all; then CPU int4 after `import ewq.hf`,
    the only EWQ line a user runs. Returns what EWQ computed, what that process reported and got, and the int4 files."""
    root = tmp_path_factory.mktemp("outside")
    cases = {"decoder": (tiny_factory("llama"), torch.bfloat16, ["raw", "8-bit", "8-bit", "8-bit"],
                         {1: {"mlp.down_proj": "raw"}}),
             "encoder": (tiny_encoder("bert-mlm"), torch.float32, ["8-bit", "raw", "8-bit"],
                         {0: {"attention.self.key": "raw"}}),
             "int4": (tiny_factory("llama"), torch.bfloat16, ["raw", "8-bit", "4-bit", "8-bit"],
                      {1: {"mlp.down_proj": "4-bit", "self_attn.q_proj": "raw"}, 2: {"self_attn.o_proj": "8-bit"}})}
    want, jobs, files = {}, [], {}
    for case, (model_dir, dtype, precisions, matrices) in cases.items():
        kind = "encoder" if case == "encoder" else "decoder"
        plan = edited_plan(model_dir, root / case, precisions, matrices)
        config = write_hf_config(plan, AO, kind, root / f"{case}-quantization_config.json")
        model = ewq_model(model_dir, plan, dtype, kind)
        saved = save(model, model_dir, plan, dtype, root / "q" / case)  # (hand-edited plans share a hash)
        want[case] = output(model, kind), weight_types(model)
        files[case] = {"base": model_dir, "plan": plan, "config": config, "saved": saved, "model": model}
        jobs.append((case, kind, str(model_dir), str(config), str(saved), str(dtype).replace("torch.", "")))
    code = RESULTS.replace("IDS", repr(IDS)) + f"""
    import importlib.util, sys
    from transformers import AutoModel, AutoModelForCausalLM, TorchAoConfig
    types, out, seen = {{}}, {{}}, {{"ewq_importable": importlib.util.find_spec("ewq") is not None}}
    for case, kind, base, config, saved, dtype in {jobs!r}:
        if case == "int4":
            try:
                TorchAoConfig.from_dict(json.load(open(config)))
            except ValueError as e:
                seen["int4_refused_without_ewq"] = str(e)
            sys.path.insert(0, {str(REPO)!r})
            import ewq.hf  # noqa: F401
        cls = AutoModelForCausalLM if kind == "decoder" else AutoModel
        qc = TorchAoConfig.from_dict(json.load(open(config)))
        for how, m in (("config", cls.from_pretrained(base, quantization_config=qc, dtype=getattr(torch, dtype),
                                                        device_map="cpu")),
                       ("saved", cls.from_pretrained(saved))):
            types[case + "-" + how], out[case + "-" + how] = weight_types(m), output(m, kind)
    save_file(out, "out.safetensors")
    print(json.dumps({{"types": types, **seen}}))
    """
    seen = run_python(code, root, ewq_importable=False)
    return want, seen, load_file(root / "out.safetensors"), files


def test_int8_plans_and_saves_load_in_a_process_that_never_imports_ewq(outside):
    want, seen, got, files = outside
    assert seen["ewq_importable"] is False
    for case, kind in (("decoder", "model.layers."), ("encoder", "encoder.layer.")):
        keys = json.loads(files[case]["config"].read_text())["quant_type"]["default"]["_data"]["fqn_to_config"]
        # the loaded model's names (not `bert.`), one per quantized weight: no bias, no raw layer, no _default
        assert all(k.startswith(kind) and k.endswith(".weight") for k in keys) and "_default" not in keys
        assert len(keys) == (3 * 7 - 1 if case == "decoder" else 2 * 6 - 1)
        meta = json.loads((files[case]["saved"] / "metadata.json").read_text())
        assert meta["hf_loadable"] is True and meta["hf_needs_import"] is None and meta["torchao_version"]
        for how in ("config", "saved"):
            assert seen["types"][f"{case}-{how}"] == want[case][1], (case, how)
            assert torch.equal(got[f"{case}-{how}"], want[case][0]), (case, how)


def test_cpu_int4_saves_once_and_loads_anywhere_after_one_import(outside, tmp_path):
    want, seen, got, files = outside
    logits, wtypes = want["int4"]
    assert set(wtypes.values()) == {"Parameter", "Int8Tensor", "Int4OpaqueTensor"}
    saved = files["int4"]["saved"]
    meta = json.loads((saved / "metadata.json").read_text())
    assert meta["hf_needs_import"] == "ewq.hf" and meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    loaded, _, _ = load_quantized(saved)  # EWQ's own loader: no re-quantizing, the same logits
    assert torch.equal(output(loaded), logits) and weight_types(loaded) == wtypes
    # without the import transformers cannot even parse the plan's config; with it, config and save load exactly
    assert "Failed to find class PrototypeInt4WeightOnlyConfig" in seen["int4_refused_without_ewq"]
    for how in ("saved", "config"):
        assert seen["types"][f"int4-{how}"] == wtypes and torch.equal(got[f"int4-{how}"], logits), how
    # another instruction set packs int4 otherwise: there the save is repacked, and equals transformers' own
    # quantize-on-load there (bit-identical to EWQ's, above); raw bytes moved across would not be
    other = "avx2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "default"
    code = RESULTS.replace("IDS", repr(IDS)) + f"""
    import ewq.hf  # noqa: F401
    from transformers import AutoModelForCausalLM, TorchAoConfig
    saved = AutoModelForCausalLM.from_pretrained({str(saved)!r})
    qc = TorchAoConfig.from_dict(json.load(open({str(files["int4"]["config"])!r})))
    fresh = AutoModelForCausalLM.from_pretrained({str(files["int4"]["base"])!r}, quantization_config=qc,
                                                 dtype=torch.bfloat16, device_map="cpu")
    print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                      "same": torch.equal(output(saved, "decoder"), output(fresh, "decoder"))}}))
    """
    there = run_python(code, tmp_path, ewq_importable=True, env={"ATEN_CPU_CAPABILITY": other})
    assert there == {"capability": other.upper(), "same": True}


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_loading_block_by_block_with_raw_blocks_on_disk_changes_nothing(tiny_factory, tmp_path, backend):
    model_dir = tiny_factory("llama")
    settings = QuantSettings(backend=backend)
    plan = edited_plan(model_dir, tmp_path, ["raw", "8-bit", "raw", "4-bit"], {1: {"mlp.up_proj": "4-bit"}})
    ids = torch.tensor(IDS)
    reference = ewq_model(model_dir, plan, torch.bfloat16, settings=settings)
    with torch.no_grad():
        want, want_tokens = reference(ids).logits, reference.generate(ids, max_new_tokens=6, do_sample=False)
    # 0.9 MB: embeddings, lm_head, the two quantized blocks (0.41 MB) and one raw block (0.33 MB) fit; the other waits
    for max_memory, where in ((None, None), ("900KB", {"disk": 1})):
        model, applied = load_for_plan(model_dir, plan, settings, torch.bfloat16, "decoder", "cpu",
                                       max_memory=max_memory, progress=False)
        placed = getattr(model, "hf_device_map", None)
        assert (placed is None) if where is None else list(placed.values()).count("disk") == 1
        assert weight_types(model) == weight_types(reference) and applied.kept_raw == []
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want_tokens)
        if where:  # a block on disk is not in the model: such a model is never saved half
            with pytest.raises(EWQError, match="has raw blocks offloaded"):
                save(model, model_dir, plan, torch.bfloat16, tmp_path / "q")
            assert not (tmp_path / "q").exists()
    with pytest.raises(EWQError, match=r"the quantized part of this model alone .* needs 0\.4\d* MB of weights, more "
                                       r"than the 0\.3 MB allowed on cpu") as refused:
        load_for_plan(model_dir, plan, settings, torch.bfloat16, "decoder", "cpu", max_memory="300KB", progress=False)
    assert "\n" not in str(refused.value)


def test_plans_for_other_weights_or_missing_layers_are_refused_and_write_nothing(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama")
    plan = edited_plan(model_dir, tmp_path, ["raw", "8-bit", "4-bit", "8-bit"])
    target = tmp_path / "quantization_config.json"
    with pytest.raises(EWQError, match="made for other weights"):
        write_hf_config(plan, AO, "decoder", target, base=tiny_factory("llama", seed=1))
    with pytest.raises(EWQError, match="made for other weights"):
        load_for_plan(tiny_factory("llama", seed=1), plan, AO, torch.bfloat16, progress=False)
    with pytest.raises(EWQError, match="holds a decoder, not an encoder"):
        write_hf_config(plan, AO, "encoder", target)
    lacking = json.loads(json.dumps(plan))
    lacking["blocks"][1]["matrices"] = {"mlp.gate_up_proj": "4-bit"}  # a fused layer this architecture does not have
    for refuse in (lambda: write_hf_config(lacking, AO, "decoder", target),
                   lambda: load_for_plan(model_dir, lacking, AO, torch.bfloat16, progress=False)):
        with pytest.raises(EWQError, match="names matrix 'mlp.gate_up_proj' in block 1, which this model does not have"):
            refuse()
    assert not target.exists() and not list(tmp_path.glob(".quantization_config.json*"))
    with pytest.raises(EWQError, match="more than the 1.00 GB --max-memory allows on cpu; a saved quantized model loads "
                                       "whole"):  # and a saved model never waits on disk
        check_fits("saved", {"weight_bytes": 2e9}, "cpu", {"cpu": 10**9})


def test_main_cache_model_writes_the_plans_quantization_config_beside_it(tiny_factory, tmp_path, capsys):
    """--write-hf-config: <plan>.quantization_config.json names exactly the weights the plan quantizes, with the
    config the torchao executor uses for each precision, and transformers parses it (after `import ewq.hf`)."""
    import main_cache_model
    from transformers import TorchAoConfig

    from ewq.common import run_cli

    model_dir = tiny_factory("llama")
    argv = ["--model", str(model_dir), "--method", "position", "--granularity", "matrix", "--target-bits", "7",
            "--out-dir", str(tmp_path), "--no-progress", "--write-hf-config"]
    assert run_cli(main_cache_model.main, argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    plan = load_plan(out[-1])
    written = next(line.split(": ", 1)[1] for line in out if line.startswith("transformers quantization_config: "))
    assert written == str(tmp_path / f"{os.path.basename(out[-1])[:-5]}.quantization_config.json")
    config = TorchAoConfig.from_dict(json.loads(open(written).read()))
    model = load_model(model_dir, torch.bfloat16)
    names = {id(m): n for n, m in model.named_modules()}
    from ewq.apply import plan_layers

    want = {f"{names[id(layer)]}.weight": precision for *_, layer, precision in plan_layers(model, plan)
            if precision != "raw"}
    assert {"8-bit", "4-bit"} <= set(want.values())
    kinds = {"8-bit": "Int8WeightOnlyConfig", "4-bit": "PrototypeInt4WeightOnlyConfig"}
    assert {k: type(v).__name__ for k, v in config.quant_type.fqn_to_config.items()} == \
        {k: kinds[p] for k, p in want.items()}


def test_benchmark_with_max_memory_runs_offloaded_and_counts_every_weight(tiny_factory, tmp_path, capsys):
    """benchmark.py --max-memory: raw blocks that do not fit wait on disk (named in the result and on stdout), the
    tokens are those of the model run whole, and the weight bytes still count the blocks on disk."""
    import benchmark

    from ewq.common import run_cli

    model_dir = tiny_factory("llama")
    plan = edited_plan(model_dir, tmp_path / "plans", ["raw", "8-bit", "raw", "8-bit"])
    fast = ["--model", str(model_dir), "--plan", str(tmp_path / "plans" / f"quant_plan_{plan_hash(plan)}.json"),
            "--backend", "torchao", "--eager", "--tasks", "math", "--max-new-tokens", "4", "--repeats", "1",
            "--no-progress", "--out-dir", str(tmp_path / "r")]
    results = []
    for extra in ([], ["--max-memory", "700KB"]):
        assert run_cli(benchmark.main, fast + extra) == 0
        out = capsys.readouterr().out
        results.append((out, json.loads(open(out.strip().splitlines()[-1]).read())))
    (_, whole), (out, placed) = results
    on_disk = placed["load"]["on_disk"]
    assert whole["load"]["on_disk"] == [] and on_disk and set(on_disk) <= {"model.layers.0", "model.layers.2"}
    assert f"{len(on_disk)} raw blocks do not fit --max-memory and are read from disk" in out
    assert placed["memory"]["weight_bytes"] == whole["memory"]["weight_bytes"]
    assert [t["token_ids"] for t in placed["tests"]] == [t["token_ids"] for t in whole["tests"]]


def test_placement_over_several_gpus_fills_them_in_order_and_never_offloads_quantized_blocks(tiny_factory, tmp_path,
                                                                                             monkeypatch):
    """--max-memory cuda:0=...,cuda:1=...: accelerate-style sequential placement computed on the CPU (a machine's GPUs
    faked through memory_budget): quantized blocks fill GPU after GPU, raw blocks go where room is left, then to the
    CPU, then to disk; a quantized block that fits no GPU is refused with the figures."""
    from ewq import apply
    from ewq.apply import empty_model, parse_max_memory, plan_device_map, torchao_targets

    assert parse_max_memory("cuda:0=1GB,cuda:1=2GiB,cpu=3GB", "cuda") == {"cuda:0": 10**9, "cuda:1": 2 * 2**30,
                                                                          "cpu": 3 * 10**9}
    assert parse_max_memory("8GB", "cuda") == {"cuda:0": 8 * 10**9} and parse_max_memory({1: 5}, "cuda") == {"cuda:1": 5}
    with pytest.raises(EWQError, match="names 'gpu1'"):
        parse_max_memory("gpu1=2GB", "cuda")
    model_dir = tiny_factory("llama")
    plan = edited_plan(model_dir, tmp_path, ["8-bit", "raw", "8-bit", "raw"])
    skeleton = empty_model(model_dir, torch.bfloat16)
    targets, _ = torchao_targets(skeleton, plan, AO)

    def placed(budget):
        monkeypatch.setattr(apply, "memory_budget", lambda device, max_memory: dict(budget))
        return plan_device_map(skeleton, plan, targets, AO, torch.bfloat16, "cuda", budget)

    # outside the blocks 0.164 MB (embeddings + lm_head, bf16), an int8 block 0.169 MB, a raw block 0.328 MB
    roomy = placed({"cuda:0": 10**7, "cuda:1": 10**7, "cpu": 10**8})
    assert set(roomy.values()) == {"cuda:0"}
    split = placed({"cuda:0": 340_000, "cuda:1": 200_000, "cpu": 400_000})
    assert [split[f"model.layers.{i}"] for i in range(4)] == ["cuda:0", "cpu", "cuda:1", "disk"]
    assert split["model.embed_tokens"] == split["lm_head"] == "cuda:0"
    with pytest.raises(EWQError, match=r"needs 0\.502 MB of weights, more than the 0\.4 MB allowed on 2 GPUs "
                                       r"\(cuda:0, cuda:1\)"):
        placed({"cuda:0": 200_000, "cuda:1": 200_000, "cpu": 10**8})


def test_freed_blocks_are_collected_once_enough_memory_was_let_go(monkeypatch):
    """The cycle collector (0.1-0.2 s a pass with torch loaded) runs once 32 MB of blocks have been let go, not after
    every small block; a 1B model's block (40 MB and up) is given back at once, and an unsized call collects now."""
    from ewq import apply

    calls = []
    monkeypatch.setattr(apply.gc, "collect", lambda *args: calls.append(args) or 0)
    monkeypatch.setattr(apply, "_freed_since_collect", 0)
    for _ in range(3):
        apply.release_freed_memory(10 << 20)
    assert calls == []
    apply.release_freed_memory(10 << 20)
    assert len(calls) == 1
    apply.release_freed_memory(44 << 20)
    assert len(calls) == 2
    apply.release_freed_memory()
    assert len(calls) == 3
