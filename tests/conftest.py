"""Tiny models the tests build themselves (dimensions multiples of 64), saved as safetensors."""

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from ewq.synthetic import save_byte_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# per-machine caches (bandwidth, analyses) of a test session stay in a temporary folder, not in ~/.cache/ewq
os.environ.setdefault("EWQ_CACHE", tempfile.mkdtemp(prefix="ewq-test-cache-"))
# ggml's rounding by the torch emulation, as on CI (no llama.cpp there), even where a llama.cpp build is found;
# test_ggml_quants checks that build against it, and EWQ_GGML_LIB=PATH runs the whole suite on ggml's own C
os.environ.setdefault("EWQ_GGML_LIB", "off")
warnings.filterwarnings("ignore", category=DeprecationWarning)
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # `make test` runs everything in 2 worker processes; `pytest -m "not slow"` skips the few tests that compile
    # or run whole scripts end to end (10-35 s each) for a quick loop while editing
    config.addinivalue_line("markers", "slow: end-to-end or compiling tests taking 10 s or more on 2 cores")

TINY = {
    "llama": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=256),
    "gpt2": dict(n_embd=128, n_layer=3, n_head=2, vocab_size=320, n_positions=256),
}


def build_tiny(kind: str, directory: Path, seed: int = 0, dtype=torch.float16, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, **{**TINY[kind], **overrides})
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    # Give blocks different weight spreads, so entropies (and the plan) differ between blocks.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and (".layers." in name or ".h." in name):
                idx = int(name.split(".layers." if ".layers." in name else ".h.")[1].split(".")[0])
                p.mul_(0.5 + idx)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 256
    model.save_pretrained(directory, safe_serialization=True)
    save_byte_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    cache = {}

    def make(kind="llama", seed=0, **overrides):
        key = (kind, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny(kind, tmp_path_factory.mktemp(kind), seed, **overrides)
        return cache[key]

    return make


@pytest.fixture
def tiny_copy(tiny_factory, tmp_path):
    """A private copy the test may modify."""

    def make(kind="llama", **kw):
        dst = tmp_path / f"{kind}_copy"
        shutil.copytree(tiny_factory(kind, **kw), dst)
        return dst

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real embedded model, converted once into the repo's models/ (reused across runs)."""
    from ewq.source import resolve_model

    return resolve_model("smollm2-135m", REPO / "models").path


# Encoders: (config type, model class whose save gives the layout's tensor names)
TINY_ENCODERS = {
    "bert": ("bert", "BertModel"),                        # encoder.layer.N (a sentence-transformers checkpoint)
    "bert-mlm": ("bert", "BertForMaskedLM"),              # bert.encoder.layer.N
    "roberta": ("roberta", "RobertaForMaskedLM"),         # roberta.encoder.layer.N
    "xlm-roberta": ("xlm-roberta", "XLMRobertaForMaskedLM"),
}


def save_wordpiece_tokenizer(directory) -> int:
    """A lower-casing WordPiece tokenizer that spells any ASCII word from letters: real text gives real lengths."""
    from transformers import BertTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()$%&/")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + \
        ["the", "a", "of", "to", "and", "in", "is", "was", "for", "on", "that", "said", "he", "it", "with"]
    path = Path(directory) / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path), do_lower_case=True).save_pretrained(directory)
    return len(vocab)


def build_tiny_encoder(kind: str, directory: Path, seed: int = 0, pooling: str | None = "mean",
                       outlier_gain: float = 0.0) -> Path:
    import json

    import transformers
    from transformers import AutoConfig

    model_type, cls = TINY_ENCODERS[kind]
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = save_wordpiece_tokenizer(directory)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=66,
                                  pad_token_id=0)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():  # blocks with different spreads, so entropies and sensitivities differ
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layer." in name:
                p.mul_(1 + int(name.split(".layer.")[1].split(".")[0]))
        if outlier_gain:  # one activation channel far above the rest at every FFN input, as in MiniLM-L6: random
            for name, p in model.named_parameters():  # weights alone have none, and whether a per-tensor int8
                if name.endswith("attention.output.LayerNorm.weight"):  # kernel then gains from outlier channels
                    p[0] *= outlier_gain  # depends on the CPU (VNNI or not)
    model.save_pretrained(directory, safe_serialization=True)
    if pooling:  # sentence-transformers' pooling files, as all-MiniLM-L6-v2 ships them
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls",
             "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
        (directory / "modules.json").write_text(json.dumps(
            [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
             {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return directory


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    cache = {}

    def make(kind="bert", **kw):
        key = (kind, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_tiny_encoder(kind, tmp_path_factory.mktemp(kind), **kw)
        return cache[key]

    return make


def layer_error_probe(dtype):
    """A seeded Linear(256 -> 192) and an input in `dtype`: returns (err, layer), where err(precision, settings) is
    the relative output error of the layer quantized by the settings' backend (its output dtype checked)."""
    from ewq.apply import quantize_layer

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192, bias=True).to(dtype)
    x = torch.randn(8, 256, dtype=dtype)
    with torch.no_grad():
        y = lin(x).float()

    def err(precision, settings):
        with torch.no_grad():
            yq = quantize_layer(lin, precision, settings, dtype)(x)
        assert yq.dtype == dtype
        return float((yq.float() - y).norm() / y.norm())

    return err, lin


@pytest.fixture
def script(capsys, monkeypatch):
    """script("benchmark.py", *args, cwd=D) or script("-m", "ewq.report", *args, cwd=D): the command run as
    `python ...` would run it (argv, working directory, `if __name__ == "__main__"`, exit code, stdout and stderr),
    but in this process, so each call does not pay for importing torch and transformers again (5-7 s on 2 cores).
    Returns an object with returncode, stdout, stderr, like subprocess.run(capture_output=True, text=True)."""
    import runpy
    import sys
    from types import SimpleNamespace

    def run(*argv, cwd):
        argv = [str(a) for a in argv]
        module = argv[1] if argv[0] == "-m" else None
        args = argv[2:] if module else argv[1:]
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [module or str(REPO / argv[0]), *args])
        capsys.readouterr()
        try:
            if module:
                with warnings.catch_warnings():  # "found in sys.modules": the package is imported already, on purpose
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(REPO / argv[0]), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run
