"""Quality against the original, the reference cache, built-in baselines and the report."""

import json
import math

import pytest
import torch

import benchmark
import benchmark_original
from ewq import report
from ewq.common import run_cli
from ewq.quality import (compute_reference, evaluate, kl_to_reference, load_corpus, make_windows, output_agreement,
                         rouge_l)

QUALITY = ["--tasks", "reasoning", "--max-new-tokens", "4", "--repeats", "1", "--no-progress", "--quality",
           "--eval-tokens", "300", "--eval-window", "64"]


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: lets tests compute perplexity and KL by hand."""

    def __init__(self, logits):
        super().__init__()
        self.table = logits  # [vocab, vocab]: logits for the next token given the current one

    def forward(self, ids):
        return type("Out", (), {"logits": self.table[ids]})()


def test_kl_matches_hand_computation_and_bounds_the_full_kl():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    full = (logp.exp() * (logp - logq)).sum(-1)
    v, i = logp.topk(12, -1)
    assert torch.allclose(kl_to_reference(logq, v, i), full, atol=1e-6)  # k = vocab: exact
    v, i = logp.topk(4, -1)
    pooled = kl_to_reference(logq, v, i)
    assert (pooled >= -1e-7).all() and (pooled <= full + 1e-6).all()  # coarsening only loses information
    assert torch.allclose(kl_to_reference(logp, v, i), torch.zeros(2, 5), atol=1e-6)


def test_perplexity_kl_and_agreement_by_hand():
    vocab = 6
    torch.manual_seed(1)
    original, variant = FixedLogits(torch.randn(vocab, vocab)), FixedLogits(torch.randn(vocab, vocab))
    windows = torch.tensor([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]])
    ref = compute_reference(original, windows, "cpu", top_k=vocab, progress=False)
    got = evaluate(variant, ref, "cpu", progress=False)
    lp, lq = torch.log_softmax(original.table, -1), torch.log_softmax(variant.table, -1)
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for w in windows.tolist():
        for cur, nxt in zip(w[:-1], w[1:]):
            nll -= lq[cur, nxt].item()
            kl += (lp[cur].exp() * (lp[cur] - lq[cur])).sum().item()
            agree += int(lq[cur].argmax() == lp[cur].argmax())
            n += 1
    assert got["eval_tokens"] == n == 8
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["kl_mean"] == pytest.approx(kl / n, rel=1e-5)
    assert got["top1_agreement"] == agree / n
    same = evaluate(original, ref, "cpu", progress=False)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0


def test_output_agreement_and_rouge():
    a = output_agreement([1, 2, 3, 4], [1, 2, 9, 4], "the cat sat", "the cat sat")
    assert a == {"prefix_match": 0.5, "token_match": 0.75, "rouge_l": 1.0}
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS "a c": P = R = 2/4
    assert rouge_l("", "a") == 0.0


def run(module, argv, capsys):
    code = run_cli(module.main, argv)
    out, err = capsys.readouterr()
    return code, out.strip().splitlines()[-1] if out.strip() else "", err


@pytest.fixture(scope="module")
def tiny_results(tiny_factory, tmp_path_factory):
    """Original, uniform-8bit and uniform-4bit runs with --quality on one tiny model (shared by tests)."""
    model = tiny_factory("llama")
    out = tmp_path_factory.mktemp("results")
    paths = {}
    for name, module, extra in (("original", benchmark_original, ["--eager"]),
                                ("uniform-8bit", benchmark, ["--plan", "uniform-8bit", "--backend", "bitsandbytes"]),
                                ("uniform-4bit", benchmark, ["--plan", "uniform-4bit", "--backend", "bitsandbytes"])):
        assert run_cli(module.main, ["--model", str(model), "--out-dir", str(out)] + QUALITY + extra) == 0
        paths[name] = max(out.glob("*_benchmark_*.json"), key=lambda p: p.stat().st_mtime)
    return model, out, {k: json.loads(v.read_text()) for k, v in paths.items()}


def test_original_kl_is_zero_and_quantized_kl_orders_by_bits(tiny_results):
    _, _, r = tiny_results
    q = {k: v["quality"] for k, v in r.items()}
    assert q["original"]["kl_mean"] == pytest.approx(0.0, abs=1e-7) and q["original"]["top1_agreement"] == 1.0
    assert q["uniform-4bit"]["kl_mean"] > q["uniform-8bit"]["kl_mean"] > 0
    assert q["uniform-4bit"]["top1_agreement"] < 1.0
    assert all(x["eval_tokens"] == 5 * 63 and x["corpus"] == "lee_background.cor" for x in q.values())
    assert not q["original"]["reference_cached"] and q["uniform-8bit"]["reference_cached"]


def test_cache_hit_gives_the_same_numbers_as_recomputation(tiny_results, tmp_path, capsys):
    model, out, r = tiny_results
    code, path, _ = run(benchmark, ["--model", str(model), "--out-dir", str(tmp_path), "--plan", "uniform-8bit",
                                    "--backend", "bitsandbytes"] + QUALITY, capsys)
    fresh = json.loads(open(path).read())["quality"]
    cached = r["uniform-8bit"]["quality"]
    assert not fresh["reference_cached"] and cached["reference_cached"]
    for k in ("perplexity", "kl_mean", "top1_agreement", "eval_tokens"):
        assert fresh[k] == cached[k]


def test_report_renders_table_and_plots(tiny_results, tmp_path, capsys):
    _, out, r = tiny_results
    code, path, err = run(report, [str(out), "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    text = open(path).read()
    for variant in ("original", "uniform-8bit", "uniform-4bit"):
        assert f"| {variant} |" in text
    row = next(line for line in text.splitlines() if line.startswith("| uniform-4bit |"))
    assert f"{r['uniform-4bit']['quality']['kl_mean']:.4f}" in row and "0/0/4" in row
    assert (tmp_path / (path.split("/")[-1][:-3] + "_size_vs_kl.png")).stat().st_size > 1000


def test_report_without_matplotlib_still_writes_the_table(tiny_results, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    _, out, _ = tiny_results
    code, path, _ = run(report, [str(out), "--out-dir", str(tmp_path)], capsys)
    assert code == 0 and "pip install matplotlib" in open(path).read() and not list(tmp_path.glob("*.png"))


def test_report_over_two_models_has_one_section_each_and_skips_damaged_files(tiny_results, tiny_factory, tmp_path,
                                                                             capsys):
    _, out, _ = tiny_results
    other = tiny_factory("llama", seed=3)
    assert run_cli(benchmark_original.main, ["--model", str(other), "--out-dir", str(tmp_path), "--eager"] + QUALITY[:7]) == 0
    (tmp_path / "ewq_benchmark_damaged_20260101-000000.json").write_text('{"schema_version": 1, "kind": "ewq", "vari')
    code, path, err = run(report, [str(out), str(tmp_path), "--out-dir", str(tmp_path / "r")], capsys)
    stdout = open(path).read()
    assert code == 0, err
    assert "skipped a damaged result file" in err and "ewq_benchmark_damaged" in err and err.count("\n") == 1
    assert stdout.count("\n## ") == 2 and "2 models/devices" in stdout
    sections = stdout.split("\n## ")[1:]
    assert sum("| original |" in sec for sec in sections) == 2 and sum("uniform-4bit" in sec for sec in sections) == 1
    code, path, _ = run(report, [str(out), str(tmp_path), "--allow-mixed", "--out-dir", str(tmp_path / "r")], capsys)
    stdout = open(path).read()
    assert code == 0 and "\n## " not in stdout.split("## Does entropy")[0]  # one cross-model table


@pytest.mark.parametrize("case,message", [
    ("missing-corpus", "cannot read corpus"),
    ("empty-corpus", "is empty"),
    ("short-corpus", "shorter than one window"),
    ("foreign-cache", "belongs to another model"),
    ("corrupt-cache", "is corrupt"),
])
def test_quality_bad_input(tiny_results, tmp_path, capsys, case, message):
    model, out, r = tiny_results
    argv = ["--model", str(model), "--out-dir", str(tmp_path / "res")] + QUALITY + ["--plan", "uniform-8bit", "--backend",
                                                                                   "bitsandbytes"]
    if case == "missing-corpus":
        argv += ["--eval-text", str(tmp_path / "nope.txt")]
    elif case == "empty-corpus":
        (tmp_path / "e.txt").write_text("  \n")
        argv += ["--eval-text", str(tmp_path / "e.txt")]
    elif case == "short-corpus":
        (tmp_path / "s.txt").write_text("too short")
        argv += ["--eval-text", str(tmp_path / "s.txt")]
    else:
        cache = out / ".reference"
        (tmp_path / "res").mkdir()
        import shutil
        shutil.copytree(cache, tmp_path / "res" / ".reference")
        target = next((tmp_path / "res" / ".reference").glob("*.safetensors"))
        if case == "corrupt-cache":
            target.write_bytes(target.read_bytes()[:200])
        else:  # a cache made for other settings, put where this run looks
            from safetensors import safe_open
            from safetensors.torch import load_file, save_file
            with safe_open(str(target), framework="pt") as f:
                key = json.loads(f.metadata()["ewq_reference"])
            key["fingerprint"] = "0" * 32
            save_file(load_file(target), target, metadata={"ewq_reference": json.dumps(key, sort_keys=True)})
    code, _, err = run(benchmark, argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not list((tmp_path / "res").glob("*.json")) if (tmp_path / "res").exists() else True


@pytest.mark.parametrize("case,message", [("empty", "no benchmark result JSON"), ("schema", "not an EWQ benchmark result")])
def test_report_bad_input(tmp_path, capsys, case, message):
    if case == "schema":
        (tmp_path / "ewq_benchmark_x_1.json").write_text(json.dumps({"schema_version": 99, "kind": "ewq"}))
    code, _, err = run(report, [str(tmp_path), "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == (2 if case == "schema" else 1)  # the skipped file is named, then the error
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())
    assert not (tmp_path / "r").exists()


def test_windows_are_disjoint_between_evaluation_and_calibration(tiny_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_factory("llama"))
    corpus = load_corpus()
    ev = make_windows(tok, corpus, 1000, 64)
    cal = make_windows(tok, corpus, 1000, 64, from_end=True)
    assert ev.shape == cal.shape == (16, 64)
    assert not set(map(tuple, ev.tolist())) & set(map(tuple, cal.tolist()))
    # the corpus is tokenized once per tokenizer and process: the windows again are the same ids, a caller's changes
    # to its windows never reach the next caller's, and another vocabulary gets its own ids
    ev[:] = 0
    again = make_windows(tok, corpus, 1000, 64)
    assert torch.equal(again, tok(corpus.text, add_special_tokens=False, return_tensors="pt").input_ids[0][:1024]
                       .view(16, 64))
    other = AutoTokenizer.from_pretrained(tiny_factory("llama"))
    other.add_tokens(["Hundreds of people"])
    assert not torch.equal(make_windows(other, corpus, 1000, 64), again)


def constructed_result(variant, kind, compiled, tok_s, weight_gb, kl=None, backend="torchao", bits=16.0):
    """A result file's fields the report reads, without running anything."""
    return {"schema_version": 1, "kind": kind, "variant": variant, "created": "2026-11-30T00:00:00Z", "_file": variant,
            "model": {"id": "m", "fingerprint": "f" * 32},
            "environment": {"device": "cpu", "device_name": "CPU X", "dtype": "bfloat16", "torch": "2.13",
                            "transformers": "5.23", "backend": backend, "compiled": compiled,
                            "instruction_set": {"torch_cpu_capability": "AVX2", "flags": ["avx2", "fma"]}},
            "settings": {"prompts": 2, "tasks": ["math"], "max_new_tokens": 8, "repeats": 1},
            "memory": {"weight_gb": weight_gb, "weight_bytes": int(weight_gb * 1e9), "peak_allocated_gb": weight_gb + 0.3,
                       "block_avg_bits_per_weight": bits},
            "speed": {"decode_tok_s_median": tok_s, "prefill_s_median": 0.1, "bandwidth_fraction": 0.5},
            "quality": None if kl is None else {"kl_mean": kl, "top1_agreement": 1 - 2 * kl, "perplexity": 26.0,
                                                "eval_tokens": 1024, "corpus": "c", "windows": 4, "window": 256,
                                                "kl_top_k": 256},
            "tests": [], "plan": None}


def test_smaller_and_faster_is_judged_against_the_original_run_the_same_way(tmp_path):
    results = [
        constructed_result("original", "original", False, 20.0, 0.27, 0.0),
        constructed_result("original+compile", "original", True, 25.0, 0.27, 0.0),
        constructed_result("uniform-8bit", "ewq", False, 10.0, 0.15, 0.004, backend="bitsandbytes", bits=8.0),
        # faster than the eager original but slower than the compiled one: not a win
        constructed_result("uniform-4bit@torchao+compile", "ewq", True, 22.0, 0.11, 0.2, bits=4.5),
        constructed_result("sensitivity-6b@torchao+compile", "ewq", True, 40.0, 0.136, 0.047, bits=6.0),
    ]
    text, _, _ = report.build_report(results, tmp_path)
    table = {r["variant"]: r for r in report.rows(results)}
    assert table["sensitivity-6b@torchao+compile"]["smaller_and_faster"] == "✓"
    assert table["sensitivity-6b@torchao+compile"]["speedup"] == pytest.approx(40 / 25)
    assert table["uniform-4bit@torchao+compile"]["smaller_and_faster"] == ""
    assert table["uniform-8bit"]["smaller_and_faster"] == "" and table["uniform-8bit"]["speedup"] == pytest.approx(0.5)
    # "what should I use?" comes first, one row per size, then plain words with the cost
    assert text.index("What should I use?") < text.index("All variants")
    assert "Use sensitivity-6b@torchao+compile (torchao, compiled): 0.50× the original's weight bytes and 1.60× its " \
           "decode speed" in text and "KL 0.0470" in text and "torch AVX2 kernels; avx2 fma" in text
    assert [r["variant"] for r in report.recommendations(report.rows(results))] == [
        "uniform-8bit", "sensitivity-6b@torchao+compile", "uniform-4bit@torchao+compile"]
    assert "competed for the CPU" not in text
    results[2]["environment"].update(load_average_1m=3.5, cpu_count=2, threads=2)  # a run on a busy machine is named
    text, _, _ = report.build_report(results, tmp_path)
    assert "other processes competed for the CPU" in text and "so their speeds are low and noisy: uniform-8bit" in text


def test_no_faster_variant_says_so_and_why(tmp_path):
    results = [constructed_result("original", "original", False, 20.0, 0.27, 0.0),
               constructed_result("uniform-8bit", "ewq", False, 10.0, 0.15, 0.004, backend="bitsandbytes", bits=8.0)]
    text, _, _ = report.build_report(results, tmp_path)
    assert "No quantized variant here is both smaller and faster than the original run the same way" in text
    assert "AVX-512" in text
