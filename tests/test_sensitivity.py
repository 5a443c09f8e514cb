"""Measured sensitivity, size-targeted allocation, and the entropy-vs-sensitivity research section."""

import itertools
import random

import pytest
import torch

import benchmark
from ewq import report
from ewq.allocate import (block_sizes, budget_bytes, item_sizes, optimal_allocation, ordered_allocation, position_order,
                          timed_allocation)
from ewq.apply import QuantSettings
from ewq.common import EWQError, run_cli
from ewq.planning import make_plan
from ewq.sensitivity import Calibration, sweep


def brute_force(costs, sizes, budget):
    best = None
    for choice in itertools.product(*[list(s) for s in sizes]):
        if sum(s[p] for s, p in zip(sizes, choice)) <= budget:
            cost = sum(c[p] for c, p in zip(costs, choice))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, choice)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_optimal_allocation_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 8)
    blocks = [{"params": rng.choice([4096, 8192, 12288]), "rows": rng.choice([64, 128])} for _ in range(n)]
    sizes = block_sizes(blocks)
    costs = []
    for _ in range(n):
        k8 = rng.uniform(0, 0.01)
        costs.append({"raw": 0.0, "8-bit": k8, "4-bit": k8 + rng.uniform(0, 0.1)})
    for target_bits in (4.6, 6.0, 9.0, 12.5, 16.0):
        budget = budget_bytes(blocks, 0, target_bits=target_bits)
        got = optimal_allocation(costs, sizes, budget)
        want_cost, _ = brute_force(costs, sizes, budget)
        assert sum(s[p] for s, p in zip(sizes, got)) <= budget  # the target is met
        assert sum(c[p] for c, p in zip(costs, got)) == pytest.approx(want_cost, abs=1e-12)  # and optimally


@pytest.mark.parametrize("seed", range(4))
def test_optimal_allocation_over_llama_cpp_formats_matches_brute_force(seed):
    """Six formats, and matrices whose rows do not fit every one (rows of 576 take no k-quant): the allocator
    offers each matrix only what it can take, and still finds the optimum."""
    rng = random.Random(seed)
    menu = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "Q4_0")
    items = [{"block": i, "matrix": "m", "params": o * c, "rows": o, "shapes": [[o, c]]}
             for i, (o, c) in enumerate(rng.choice([(64, 576), (64, 256), (128, 512)]) for _ in range(rng.randint(3, 5)))]
    sizes = item_sizes(items, menu=menu)
    assert all("Q6_K" not in s for s, it in zip(sizes, items) if it["shapes"][0][1] == 576)
    bits = {"raw": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K": 5.5, "Q5_0": 5.5, "Q4_K": 4.5, "Q4_0": 4.5}
    costs = [{p: 0.0 if p == "raw" else rng.uniform(0, 0.01) * (17 - bits[p]) for p in s} for s in sizes]
    params = sum(it["params"] for it in items)
    for target_bits in (4.6, 5.2, 6.0, 7.5, 12.0):
        budget = target_bits / 8 * params
        got = optimal_allocation(costs, sizes, budget)
        want_cost, _ = brute_force(costs, sizes, budget)
        assert sum(s[p] for s, p in zip(sizes, got)) <= budget
        assert sum(c[p] for c, p in zip(costs, got)) == pytest.approx(want_cost, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_timed_allocation_meets_both_limits_and_buys_speed_only_when_asked(seed):
    """--speed preset: a plan within the bytes and within a decode-time limit (here: the time of the all-fast
    preset-like plan, where one format is fast per byte and another slow); loose limits change nothing; a limit no
    plan meets is one line."""
    from ewq.common import EWQError

    rng = random.Random(seed)
    menu = ("Q8_0", "Q5_0", "Q4_0")
    items = [{"block": i, "matrix": "m", "params": 64 * 576, "rows": 64, "shapes": [[64, 576]]} for i in range(6)]
    sizes = item_sizes(items, menu=menu)
    kernel = {"raw": 2.0, "Q8_0": 1.5, "Q5_0": 1.5, "Q4_0": 1.0}  # Q5_0 as slow per weight as Q8_0: as on AVX2
    times = [{p: it["params"] * kernel[p] for p in s} for it, s in zip(items, sizes)]
    # Q5_0 is the quality bargain per byte, so the size-only optimum takes it
    costs = [{"raw": 0.0, "Q8_0": x, "Q5_0": 4 * x, "Q4_0": 40 * x} for x in (rng.uniform(1e-4, 1e-3) for _ in items)]
    params = sum(it["params"] for it in items)
    for target_bits in (5.2, 6.0, 7.0):
        budget = target_bits / 8 * params
        free = optimal_allocation(costs, sizes, budget)
        assert "Q5_0" in free
        preset = ordered_allocation(range(len(items)), sizes, budget, ("Q8_0", "Q4_0"))  # fast formats only
        limit = sum(t[p] for t, p in zip(times, preset))
        got = timed_allocation(costs, sizes, budget, times, limit)
        assert sum(s[p] for s, p in zip(sizes, got)) <= budget
        assert sum(t[p] for t, p in zip(times, got)) <= limit
        # the slow format is traded away for speed, and the plan is no worse than the fast-only preset's choice
        assert sum(t[p] for t, p in zip(times, got)) < sum(t[p] for t, p in zip(times, free))
        assert sum(c[p] for c, p in zip(costs, got)) <= sum(c[p] for c, p in zip(costs, preset)) + 1e-15
        loose = timed_allocation(costs, sizes, budget, times, 10 * limit)
        assert loose == free
    with pytest.raises(EWQError, match="no plan within the size target decodes within the time limit"):
        timed_allocation(costs, sizes, 4.6 / 8 * params, times, 0.5 * params)


def test_ordered_allocation_lowers_the_lowest_first_and_meets_the_target():
    blocks = [{"params": 65536, "rows": 64}] * 6  # raw 16, 8-bit 8.03, 4-bit 4.5 bits per weight
    sizes = block_sizes(blocks)
    entropy = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0]
    order = sorted(range(6), key=lambda i: entropy[i])
    budget = budget_bytes(blocks, 0, target_bits=12.5)
    got = ordered_allocation(order, sizes, budget)
    assert got == ["8-bit", "8-bit", "8-bit", "raw", "raw", "raw"]
    got = ordered_allocation(order, sizes, budget_bytes(blocks, 0, target_bits=6.0))
    assert sum(s[p] for s, p in zip(sizes, got)) <= budget_bytes(blocks, 0, target_bits=6.0)
    assert [got[i] for i in order] == ["4-bit"] * 4 + ["8-bit"] * 2  # lowest entropy hardest
    assert position_order(6) == [2, 3, 1, 4, 0, 5]


def test_unreachable_target_is_refused_with_the_smallest_size():
    blocks = [{"params": 6400, "rows": 64}] * 4
    with pytest.raises(EWQError, match=r"smallest reachable plan .* 4\.500 bits per weight"):
        budget_bytes(blocks, 1000, target_bits=4.0)
    with pytest.raises(EWQError, match="GB for the whole model"):
        budget_bytes(blocks, 1000, max_weight_gb=1e-6)


def test_streamed_calibration_is_the_whole_model_and_the_sweep_restores_it(tiny_factory):
    """The sweep never builds the model: blocks are read one at a time, yet the hidden states and the reference are
    those of the whole model, bit for bit; after the sweep every block holds its float layers again."""
    from ewq.apply import load_model, quantizable_layers
    from ewq.checkpoint import open_checkpoint
    from ewq.quality import compute_reference
    from ewq.source import resolve_model

    for kind in ("llama", "gpt2"):
        model_dir = tiny_factory(kind)
        calibration = Calibration(resolve_model(str(model_dir)), open_checkpoint(model_dir), "f" * 32, 200, None, 64,
                                  QuantSettings(), "block", "cpu").load(progress=False)
        model = load_model(model_dir, torch.float32)
        whole = compute_reference(model, calibration.windows, "cpu", progress=False)
        for name in ("top_logp", "top_index", "top1"):
            assert torch.equal(calibration.reference[name], whole[name])
        layers_before = [len(quantizable_layers(calibration.sm.block(i))) for i in range(len(calibration.sm.blocks))]
        rows = sweep(calibration, progress=False)
        assert [len(quantizable_layers(calibration.sm.block(i))) for i in range(len(calibration.sm.blocks))] == layers_before
        assert calibration.score([]) == 0.0
        assert all(r["4-bit"] > r["8-bit"] > 0 for r in rows)


def test_sensitivity_plan_is_cached_and_hits_targets(tiny_factory, tmp_path, capsys):
    model_dir = str(tiny_factory("llama"))
    path1, plan1, _ = make_plan(model_dir, method="sensitivity", out_dir=tmp_path, progress=False, calib_tokens=300)
    assert plan1["run"]["sensitivity_cached"] is False
    rule = make_plan(model_dir, out_dir=tmp_path, progress=False)[1]
    assert plan1["method"]["target"]["target_bits"] == rule["size"]["avg_bits_per_weight"]
    assert plan1["size"]["avg_bits_per_weight"] <= rule["size"]["avg_bits_per_weight"]
    for b in plan1["blocks"]:
        assert b["kl_4bit"] > b["kl_8bit"] > 0 and set(b["entropies"]) == {"histogram", "softmax"}
    path2, plan2, _ = make_plan(model_dir, method="sensitivity", target_bits=6.0, out_dir=tmp_path, progress=False,
                                calib_tokens=300)
    assert plan2["run"]["sensitivity_cached"] is True and path2 != path1
    assert [b["kl_4bit"] for b in plan2["blocks"]] == [b["kl_4bit"] for b in plan1["blocks"]]
    assert plan2["size"]["avg_bits_per_weight"] <= 6.0
    _, plan3, _ = make_plan(model_dir, method="position", target_bits=6.0, out_dir=tmp_path, progress=False)
    assert plan3["size"]["avg_bits_per_weight"] <= 6.0
    # position keeps the most bits at the ends
    bits = {"raw": 16, "8-bit": 8, "4-bit": 4}
    p = [bits[b["precision"]] for b in plan3["blocks"]]
    assert p[0] >= p[1] and p[-1] >= p[-2]
    code = run_cli(__import__("main_cache_model").main, ["--model", model_dir, "--method", "sensitivity", "--target-bits",
                                                         "3", "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "smallest reachable plan" in err and not list((tmp_path / "x").glob("*.json"))


@pytest.mark.slow
def test_report_answers_the_research_question(tiny_factory, tmp_path, capsys):
    model_dir = str(tiny_factory("llama"))
    plans = tmp_path / "plans"
    sens = make_plan(model_dir, method="sensitivity", target_bits=8.0, out_dir=plans, progress=False, calib_tokens=300)[0]
    ent = make_plan(model_dir, method="entropy", target_bits=8.0, out_dir=plans, progress=False)[0]
    out = tmp_path / "results"
    fast = ["--model", model_dir, "--out-dir", str(out), "--tasks", "math", "--max-new-tokens", "3", "--repeats", "1",
            "--no-progress", "--quality", "--eval-tokens", "200", "--eval-window", "64", "--backend", "bitsandbytes"]
    for plan in (sens, ent, "uniform-8bit"):
        assert run_cli(benchmark.main, fast + ["--plan", str(plan)]) == 0
    capsys.readouterr()
    assert run_cli(report.main, [str(out), "--out-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "## Does entropy predict sensitivity?" in text
    assert "| histogram |" in text and "| softmax |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 8.00 |")]
    assert {r.split("|")[2].strip() for r in rows} == {"sensitivity-8b", "ewq-histogram-8b"}
    assert list(tmp_path.glob("*_entropy_vs_sensitivity.png"))


def test_spearman():
    assert report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert report.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def test_fast_sweep_agrees_with_the_exact_one(tiny_factory, tmp_path):
    """The default sweep (second-order estimate from one forward and two backward passes) ranks the matrices as
    the exact sweep (one forward per matrix and format) does, and its plan is as good within the stated tolerance:
    Spearman >= 0.8 per format, whole-plan KL within 25 % of the exact plan's, both far below random plans."""
    model_dir = str(tiny_factory("llama", num_hidden_layers=2))
    kw = dict(method="sensitivity", granularity="matrix", backend="bitsandbytes", target_bits=6.0, out_dir=tmp_path,
              progress=False, calib_tokens=200)
    plans = {s: make_plan(model_dir, **kw, sweep=s)[1] for s in ("exact", "fast")}
    single = {s: [v for b in p["blocks"] for v in b["matrix_kl"].values()] for s, p in plans.items()}
    for precision in ("8-bit", "4-bit"):
        exact, fast = ([row[precision] for row in single[s]] for s in ("exact", "fast"))
        assert report.spearman(exact, fast) >= 0.8
    exact_kl, fast_kl = (plans[s]["checks"]["measured_kl"] for s in ("exact", "fast"))
    assert fast_kl <= 1.25 * exact_kl
    assert max(exact_kl, fast_kl) < 0.5 * plans["fast"]["checks"]["random_mean_kl"]
    assert plans["fast"]["method"]["sweep"].startswith("fast") and "sweep" not in plans["exact"]["method"]


def test_fast_sweep_per_block_measures_the_block_output(tiny_factory, tmp_path):
    """Per block, the fast sweep estimates a block's KL from the change of the block's output (the whole block
    quantized, effects between its matrices included): each block's estimate is within a factor 2 of the exact KL,
    and the plan it picks is as good as the exact sweep's within 25 %."""
    model_dir = str(tiny_factory("llama"))
    kw = dict(method="sensitivity", granularity="block", backend="bitsandbytes", target_bits=6.0, out_dir=tmp_path,
              progress=False, calib_tokens=120)
    plans = {s: make_plan(model_dir, **kw, sweep=s)[1] for s in ("exact", "fast")}
    for exact, fast in zip(plans["exact"]["blocks"], plans["fast"]["blocks"]):
        assert 0.5 < fast["kl_4bit"] / exact["kl_4bit"] < 2
    assert plans["fast"]["checks"]["measured_kl"] <= 1.25 * plans["exact"]["checks"]["measured_kl"]
    assert plans["fast"]["method"]["calibration"]["fisher_at"] == "block output"


def test_fast_sweep_resumes_from_the_last_finished_block(tiny_factory, tmp_path, monkeypatch):
    """Killed half-way (here: Ctrl-C after two of four blocks), the fast sweep starts again at the block it reached,
    from the gradients it had written, and gives the numbers of an uninterrupted sweep."""
    from ewq import sensitivity
    from ewq.checkpoint import open_checkpoint
    from ewq.source import resolve_model

    model_dir = tiny_factory("llama")
    items = [{"block": b, "matrix": m} for b in range(4) for m in ("self_attn.q_proj", "mlp.down_proj")]

    def calibration():
        return Calibration(resolve_model(str(model_dir)), open_checkpoint(model_dir), "f" * 32, 200, None, 64,
                           QuantSettings(), "matrix", "cpu", sweep_kind="fast")

    whole = sensitivity.fast_sweep(calibration(), items, progress=False)
    real_save, real_backward = sensitivity.SweepState.save_progress, sensitivity.block_backward
    saved = []

    def save_then_stop(self, next_block, rows, grads):
        real_save(self, next_block, rows, grads)
        saved.append(next_block)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sensitivity.SweepState, "save_progress", save_then_stop)
    state = tmp_path / "state.partial"
    with pytest.raises(KeyboardInterrupt):
        sensitivity.fast_sweep(calibration(), items, progress=False, state_dir=state)
    assert saved == [2, 1] and (state / "progress.json").is_file()
    monkeypatch.setattr(sensitivity.SweepState, "save_progress", real_save)
    blocks_run = []
    monkeypatch.setattr(sensitivity, "block_backward",
                        lambda c, i, *a: blocks_run.append(i) or real_backward(c, i, *a))
    resumed = sensitivity.fast_sweep(calibration(), items, progress=False, state_dir=state)
    assert blocks_run == [1, 0]  # only the blocks not finished before
    assert resumed == whole
    assert not state.exists()  # the resume state is gone once the sweep is complete


def test_a_machine_too_small_for_one_block_is_refused_before_any_block_is_read(tiny_factory, tmp_path, monkeypatch):
    import collections

    import psutil

    from ewq import stream

    model_dir = str(tiny_factory("llama"))
    reads = []
    real_block = stream.StreamedModel.block
    monkeypatch.setattr(stream.StreamedModel, "block", lambda self, i: reads.append(i) or real_block(self, i))
    fake = collections.namedtuple("fake", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake(1_000_000))  # 1 MB free
    with pytest.raises(EWQError, match=r"the sensitivity sweep needs about .* GB at once .* more than the 0\.00 GB free"):
        make_plan(model_dir, method="sensitivity", out_dir=tmp_path, progress=False, calib_tokens=200)
    assert reads == [] and not list(tmp_path.glob("quant_plan_*.json"))


def test_a_llama_cpp_sweep_sees_the_rounding_of_the_activations(tiny_copy, tmp_path):
    """llama.cpp rounds a product's input as well as the weights (Q8_0 per 32 values for a Q8_0 matrix): a matrix
    whose weights Q8_0 keeps exactly still changes the output, and the sweep, the head's estimate and the plan's
    checks measure it (on SmolLM2 that is most of a Q8_0 file's KLD)."""
    from safetensors.torch import load_file, save_file

    model = tiny_copy("llama", num_hidden_layers=2)
    tensors = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if w.dim() == 2 and (".layers." in name or name == "lm_head.weight"):
            # on Q8_0's grid, exactly (also in fp16 and bf16): levels -127..127 of a power-of-two step per 32 weights,
            # each block's largest on level 127
            q = torch.randint(-127, 128, w.shape, generator=g).float()
            q.view(-1, 32)[:, 0] = 127
            tensors[name] = (q * 2.0 ** -9).to(w.dtype)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    _, plan, _ = make_plan(str(model), method="sensitivity", granularity="matrix", backend="llama.cpp",
                           formats=("Q8_0", "Q4_0"), target_bits=8.5, out_dir=tmp_path, progress=False,
                           calib_tokens=64)
    rows = [row for b in plan["blocks"] for row in b["matrix_kl"].values()]
    assert len(rows) == 14 and all(row["Q8_0"] > 0 for row in rows)  # the weights alone would give 0.0
    assert plan["other"]["matrix_kl"]["lm_head.weight"]["Q8_0"] > 0 and plan["checks"]["measured_kl"] > 0
    assert "Q8_K" in plan["method"]["formats"]["activations"]
