"""The default executor and mode: chosen by a probe of this machine, cached, recorded, the same for the original."""

import json

import pytest
import torch

import benchmark
import benchmark_original
from ewq import executor
from ewq.common import EWQError, run_cli

FAST = ["--tasks", "math", "--max-new-tokens", "4", "--repeats", "1", "--no-progress"]
LAYOUT = executor.Layout([(128, 128), (256, 128), (128, 256)], 4, "decoder")


CANDIDATES = {"ta_e": ("torchao", False), "ta_c": ("torchao", True), "bnb": ("bitsandbytes", False)}


def probe_record(**ms):
    """A probe where each candidate (CANDIDATES' short names) took the given milliseconds for its 8-bit and 4-bit
    layers; the unquantized layers took 10 ms."""
    rows = []
    for name, (t8, t4) in ms.items():
        backend, compiled = CANDIDATES[name]
        rows.append({"backend": backend, "compile": compiled, "dtype": "bfloat16", "float_ms": 10.0, "8bit_ms": t8,
                     "4bit_ms": t4, "speedup_8bit": 10.0 / t8, "speedup_4bit": 10.0 / t4})
    return {"candidates": rows, "shapes": LAYOUT.shapes, "blocks": 4, "tokens": 1}


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """run_probe replaced by a recorded answer; counts how often the machine would really be probed."""
    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    calls = []

    def install(record):
        def run_probe(layout, device, dtype_of, progress=True, wanted=None):
            calls.append(layout)
            return {**record, "candidates": [r for r in record["candidates"]
                                             if wanted is None or (r["backend"], r["compile"]) in wanted]}
        monkeypatch.setattr(executor, "run_probe", run_probe)
        return calls
    return install


def test_the_fastest_quantized_layers_win_and_the_probe_runs_once(fake_probe):
    calls = fake_probe(probe_record(ta_e=(20.0, 5.0), ta_c=(4.0, 2.0), bnb=(30.0, 25.0)))
    bf16 = lambda b: torch.bfloat16  # noqa: E731
    choice = executor.choose(LAYOUT, "cpu", bf16, progress=False)
    assert (choice.backend, choice.compile) == ("torchao", True) and choice.label == "torchao, compiled"
    assert "2.50x/5.00x the unquantized layers in the same mode" in choice.why and "probe cached in" in choice.why
    assert "torch " in choice.why  # the instruction set the kernels ran with is named
    # flags narrow the choice; the machine is not probed again (cached per machine, shapes and versions)
    assert executor.choose(LAYOUT, "cpu", bf16, progress=False, compile=False).backend == "torchao"
    assert executor.choose(LAYOUT, "cpu", bf16, progress=False, backend="bitsandbytes").compile is False
    assert len(calls) == 1
    other = executor.Layout([(64, 64)], 2, "decoder")  # another model's shapes: probed anew
    executor.choose(other, "cpu", bf16, progress=False)
    assert len(calls) == 2


def test_a_machine_where_nothing_is_faster_says_so(fake_probe):
    fake_probe(probe_record(ta_e=(20.0, 15.0), bnb=(30.0, 25.0)))
    choice = executor.choose(LAYOUT, "cpu", lambda b: torch.bfloat16, progress=False)
    assert choice.backend == "torchao" and "no executor's quantized layers are faster" in choice.why


def test_no_runnable_executor_is_one_error_line(fake_probe):
    record = probe_record()
    record["candidates"] = [{"backend": "torchao", "compile": False, "error": "RuntimeError: no kernel"}]
    fake_probe(record)
    with pytest.raises(EWQError, match="no executor could run on cpu here .*no kernel.*pass --backend"):
        executor.choose(LAYOUT, "cpu", lambda b: torch.bfloat16, progress=False)


def test_the_real_probe_times_every_candidate_at_the_models_shapes(tiny_factory, tmp_path, capsys, monkeypatch):
    """No executor flag (only --eager, to keep this test free of compiling): the machine is probed, the choice is
    printed in one line and recorded in the result with the instruction set it ran on."""
    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_factory("llama")
    argv = ["--model", str(model_dir), "--plan", "uniform-8bit", "--eager", "--out-dir", str(tmp_path / "r")] + FAST
    assert run_cli(benchmark.main, argv) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("executor: "))
    result = json.loads(open(out.strip().splitlines()[-1]).read())
    choice = result["environment"]["executor_choice"]
    assert choice["chosen_by"] == "probe" and choice["compile"] is False
    assert result["environment"]["backend"] == choice["backend"] in ("torchao", "bitsandbytes") and choice["backend"] in line
    assert result["environment"]["instruction_set"]["torch_cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    probe = json.loads(next((tmp_path / "cache" / "executors").glob("probe_*.json")).read_text())["probe"]
    timed = {(r["backend"], r["compile"]) for r in probe["candidates"] if "error" not in r}
    assert {("torchao", False), ("bitsandbytes", False)} <= timed
    assert all(r["rel_error_8bit"] < 0.05 and r["rel_error_4bit"] < 0.2 for r in probe["candidates"] if "error" not in r)


@pytest.mark.slow
def test_the_original_is_timed_in_the_mode_the_probe_chose(tiny_factory, tmp_path, capsys, fake_probe):
    """When the fastest executor here runs compiled, the original runs compiled too (same mode); named executor
    flags skip the probe and keep the published proof of concept's way (bitsandbytes, eager)."""
    fake_probe(probe_record(ta_e=(20.0, 5.0), ta_c=(4.0, 2.0), bnb=(30.0, 25.0)))
    model_dir = tiny_factory("llama")
    argv = ["--model", str(model_dir), "--dtype", "float32", "--out-dir", str(tmp_path / "r")] + FAST
    assert run_cli(benchmark_original.main, argv) == 0
    out = capsys.readouterr().out
    original = json.loads(open(out.strip().splitlines()[-1]).read())
    assert "mode: compiled, the mode of this machine's fastest executor (torchao, compiled)" in out
    assert original["environment"]["compiled"] is True and original["variant"] == "original+compile"
    assert original["environment"]["executor_choice"]["chosen_by"] == "probe"
    assert run_cli(benchmark.main, argv + ["--plan", "uniform-8bit", "--backend", "bitsandbytes"]) == 0
    poc = json.loads(open(capsys.readouterr().out.strip().splitlines()[-1]).read())
    assert poc["environment"]["compiled"] is False and poc["environment"]["executor_choice"]["chosen_by"] == "flags"


def test_a_probe_timed_on_a_busy_machine_is_flagged_and_measured_again_when_quiet(fake_probe, monkeypatch, capsys):
    """Timings taken while other processes hold cores misrank executors (a stack 100x slow): such a probe warns, is
    recorded as busy, and is replaced at the first run on a quiet machine; a quiet probe is kept."""
    calls = fake_probe(probe_record(ta_e=(20.0, 5.0), ta_c=(4.0, 2.0), bnb=(30.0, 25.0)))
    real_run_probe = executor.run_probe

    def run_probe(*args, **kwargs):  # the fake answer, with the load the real probe records
        return {**real_run_probe(*args, **kwargs), "busy_cores": executor.busy_cores("cpu")}
    monkeypatch.setattr(executor, "run_probe", run_probe)
    bf16 = lambda b: torch.bfloat16  # noqa: E731
    monkeypatch.setattr(executor, "busy_cores", lambda device: 1.5)
    executor.choose(LAYOUT, "cpu", bf16, progress=False)
    executor.choose(LAYOUT, "cpu", bf16, progress=False)  # still busy: the busy probe is all there is
    assert len(calls) == 1
    monkeypatch.setattr(executor, "busy_cores", lambda device: 0.0)
    executor.choose(LAYOUT, "cpu", bf16, progress=False)
    executor.choose(LAYOUT, "cpu", bf16, progress=False)
    assert len(calls) == 2  # measured again once, then cached


def test_a_run_on_a_busy_cpu_says_its_speeds_are_not_to_be_trusted():
    from ewq.probes import competed

    quiet = {"device": "cpu", "load_average_1m": 2.3, "cpu_count": 2, "threads": 2}  # this run's own two threads
    assert competed(quiet) is None
    assert "other processes competed" in competed({**quiet, "load_average_1m": 3.4})
    assert "other processes competed" in competed({**quiet, "threads": 1, "load_average_1m": 2.3})
    assert competed({**quiet, "device": "cuda", "load_average_1m": 9.0}) is None
