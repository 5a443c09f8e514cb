"""Every --help line is true for every backend (issue 28.3): the lines that were not."""

import pytest

import main_cache_model
from ewq.runner import build_parser


def help_of(parser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return " ".join(action.help.split())


@pytest.fixture
def plan_parser(monkeypatch):
    """main_cache_model.py's parser (its parse_args builds it and parses at once: catch it on the way)."""
    import argparse

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def keep(self, *args, **kwargs):
        captured["parser"] = self
        return real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    main_cache_model.parse_args([])
    return captured["parser"]


def test_max_weight_gb_says_llama_cpp_plans_the_embeddings_and_head(plan_parser):
    text = help_of(plan_parser, "--max-weight-gb")
    assert "stay 16-bit" not in text  # (what it said: false for llama.cpp, and for float32 runs)
    assert "llama.cpp the embeddings and lm_head are planned" in text and "32-bit" in text
    assert "llama.cpp the embeddings and output head too" in help_of(plan_parser, "--target-bits")


def test_the_plan_flags_of_one_executor_name_it(plan_parser):
    for flag, backend in (("--group-size", "torchao"), ("--int8-activations", "torchao"),
                          ("--quant-type", "bitsandbytes"), ("--formats", "llama.cpp")):
        assert backend in help_of(plan_parser, flag), flag
    assert "only --method sensitivity keeps to 8-bit" in help_of(plan_parser, "--backend")  # torch-dynamic


@pytest.mark.parametrize("kind", ["ewq", "original"])
def test_benchmark_help_is_true_for_every_backend(kind):
    p = build_parser(kind)
    assert "--backend llama.cpp" in help_of(p, "--dtype") and "cpu only" in help_of(p, "--device")
    if kind == "original":
        assert "torch-dynamic" not in help_of(p, "--dtype") + help_of(p, "--device")  # it has no such backend
        return
    assert "Every backend" not in help_of(p, "--save") and "llama.cpp" in help_of(p, "--save")
    assert "settings digest" in help_of(p, "--save")
    for flag in ("--quant-type", "--double-quant", "--int8-threshold"):
        assert help_of(p, flag).startswith("bitsandbytes:"), flag
    for flag in ("--device-map", "--max-memory"):
        assert "Not with --backend llama.cpp" in help_of(p, flag), flag
    assert "GGUF" in help_of(p, "--plans-dir")
