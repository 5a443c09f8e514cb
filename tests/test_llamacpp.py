"""The optional llama.cpp executor (ewq.backends.llamacpp).

Without llama-cpp-python (CI): the module imports, require() and the model refuse with one install line, and
file_bytes_by_type reads a GGUF written by ewq.gguf_export. With it (skipped cleanly where `import llama_cpp`
fails): a tiny llama exported to GGUF F32 is run by llama.cpp and compared with transformers in float32 --
logits at every position, greedy tokens, the generate() contract generate_exact relies on, and the refusals.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ewq.backends import llamacpp
from ewq.common import EWQError
from ewq.gguf_export import export_gguf, row_bytes

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parent.parent


# ---- bench/llamacpp.py: what it refuses before building anything ----

def test_bench_refuses_evaluation_text_that_overlaps_the_calibration_text(tiny_factory, tmp_path, capsys):
    """Quality is judged on text neither the sweep nor the importance matrix saw: an --eval-text sharing a passage
    with the calibration text is one line, exit 2, before any file or tool is made."""
    from bench import llamacpp as bench
    from ewq.common import run_cli

    lines = [f"Sentence number {i} says something of its own about the weather in town {i * 7}." for i in range(120)]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n")
    other = [f"Another line, {i}, on trains and timetables that run late on Sundays {i * 3}." for i in range(60)]
    # the evaluation slice (the middle of the file) holds the calibration's passage (the end of calib.txt)
    (tmp_path / "eval.txt").write_text("\n".join(other[:30] + lines[110:] + other[30:]) + "\n")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_factory("llama")), "--out-dir", str(out), "--calib-text", str(tmp_path / "calib.txt"),
            "--calib-tokens", "200", "--eval-text", str(tmp_path / "eval.txt"), "--chunks", "2", "--ctx", "256",
            "--presets", "", "--no-ewq", "--llama-bin", str(tmp_path / "no-tools")]  # a missed refusal fails fast
    assert run_cli(bench.main, argv) == 2
    err = capsys.readouterr().err
    assert "overlaps the calibration text" in err and err.count("\n") == 1 and not out.exists()
    # the check itself: whitespace does not hide an overlap; disjoint texts pass
    with pytest.raises(EWQError, match="overlaps"):
        bench.check_overlap(" ".join(lines[:3]), "x " + "\n\n".join(lines[1:3]), "e")
    bench.check_overlap("\n".join(lines[:60]), "\n".join(lines[60:]), "e")


def test_bench_ewq_formats_names_its_files_apart_and_refuses_unknown_types(tiny_factory, tmp_path, capsys, monkeypatch):
    """--ewq-formats: EWQ files of another menu never take the default menu's names (nor --reuse its files); an
    unknown type is one line, exit 2, before anything is made."""
    from bench import llamacpp as bench
    from ewq.common import run_cli

    model = str(tiny_factory("llama"))
    names = {}
    for formats in (None, "Q8_0,Q5_1", "q8_0, Q5_1", "Q8_0,Q4_1"):
        args = bench.parse_args(["--model", model, "--presets", "Q8_0", *(["--ewq-formats", formats] if formats else [])])
        bench.check_args(args)
        names[formats] = [n for n, kind, _ in bench.ladder_rows("m", ["Q8_0"], args) if kind.startswith("ewq")]
    for speed in ("any", "0.95"):
        args = bench.parse_args(["--model", model, "--presets", "Q8_0", "--ewq-speed", speed])
        bench.check_args(args)
        names[speed] = [n for n, kind, _ in bench.ladder_rows("m", ["Q8_0"], args) if kind.startswith("ewq")]
    table = tmp_path / "decode_cost.json"  # --ewq-decode-cost: files timed by another CPU's table are named apart
    table.write_text(json.dumps({"schema_version": 1, "formats": [{"format": "Q4_0", "cost_vs_q4_0_mean": 1.0}]}))
    args = bench.parse_args(["--model", model, "--presets", "Q8_0", "--ewq-decode-cost", str(table)])
    bench.check_args(args)
    names["dc"] = [n for n, kind, _ in bench.ladder_rows("m", ["Q8_0"], args) if kind.startswith("ewq")]
    r = bench.rounding_tag()
    assert names["dc"][0].startswith(f"m-ewq-{r}dc") and names["dc"][0] not in names[None]
    assert names["any"][0] == f"m-ewq-{r}any-Q8_0.gguf" and names["0.95"][0] == f"m-ewq-{r}speed0.95-Q8_0.gguf"
    assert names[None] == [f"m-ewq-{r}Q8_0.gguf", f"m-ewq-{r}Q8_0-imatrix.gguf"]
    assert names["Q8_0,Q5_1"] == names["q8_0, Q5_1"]  # the same menu, however written
    assert len({n for v in names.values() for n in v if v is not names["q8_0, Q5_1"]}) == 12
    # a sweep that rounds otherwise (another EWQ) names its files apart: --reuse never takes an earlier one's
    from ewq.backends import llamacpp

    monkeypatch.setattr(llamacpp, "ACTIVATIONS", "not rounded")
    assert bench.rounding_tag() != r
    out = tmp_path / "out"
    for bad, message in ((["--ewq-formats", "Q8_0,Q7_K"], "Q7_K"), (["--ewq-decode-cost", str(model)], "is not a decode "
                                                                     "cost table")):
        assert run_cli(bench.main, ["--model", model, "--out-dir", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists()


def test_bench_ladder_table_gives_kld_and_speed_as_multiples_of_the_imatrix_preset():
    """The ladder's table puts each file's KLD and tg median beside the importance-matrix preset's, as the
    multiples the goal is stated in, per thread count."""
    from types import SimpleNamespace

    from bench import llamacpp as bench

    def row(kind, kld, tg1, tg2):
        return {"preset": "Q4_K_M", "kind": kind, "kld_mean": kld, "file_bytes": 1e8, "bpw": 6.0, "same_top_pct": 90.0,
                "speed": [{"threads": 1, "tg_tok_s_median": tg1}, {"threads": 2, "tg_tok_s_median": tg2}]}

    table = bench.ladder_markdown([row("preset+imatrix", 0.04, 80.0, 100.0), row("ewq+imatrix", 0.02, 76.0, 110.0)],
                                  SimpleNamespace(n_gen=64, threads=[1, 2]))
    base, ewq = table.splitlines()[2:]
    assert "| 0.50× |" in ewq and "| 76.0 (0.95×) | 110.0 (1.10×) |" in ewq
    assert "×" not in base.split("| 0.0400 |")[1]  # the reference row is not a multiple of itself


# ---- without llama-cpp-python ----

def test_module_imports_and_refuses_with_one_install_line_without_llama_cpp():
    code = ("import sys; sys.modules['llama_cpp'] = None\n"  # `import llama_cpp` now raises ImportError
            "import ewq.backends.llamacpp as m\n"
            "from ewq.common import EWQError\n"
            "for f in (m.require, lambda: m.LlamaCppModel('x.gguf')):\n"
            "    try:\n"
            "        f()\n"
            "    except EWQError as e:\n"
            "        print(str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]  # one line each, the same for both
    msg = lines[0]
    assert "llama-cpp-python" in msg and "not in requirements.txt" in msg
    assert 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -v' in msg and "llama_cpp_python-0.3.36.tar.gz" in msg
    assert "pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36" in msg
    assert "minutes" in msg  # the build time


def test_require_error_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(EWQError) as e:
        llamacpp.require()
    assert "\n" not in str(e.value) and llamacpp.INSTALL in str(e.value)


def test_file_bytes_by_type_counts_every_tensor_by_its_type(tiny_factory, tmp_path):
    from ewq.ggml_quants import quantize_to_bytes

    src = tiny_factory("llama", hidden_size=256, intermediate_size=512)  # k-quants need rows of 256
    plan = {"model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q6_K",
            "model.layers.0.self_attn.q_proj.weight": "Q4_K", "model.layers.0.mlp.down_proj.weight": "Q4_0",
            "model.layers.1.mlp.up_proj.weight": "F16"}
    out = tmp_path / "m.gguf"
    r = export_gguf(src, out, plan, default_type="BF16", quantize_fn=quantize_to_bytes, progress=False)
    assert not r["pending_kquants"]

    expected = {}
    reader = gguf.GGUFReader(out)
    for t in reader.tensors:  # rows x bytes per row of its type: what the type costs, independent of the reader
        name = t.tensor_type.name
        shape = [int(n) for n in t.shape]  # ggml order: ne0 = row length first
        expected[name] = expected.get(name, 0) + int(np.prod(shape[1:])) * row_bytes(name, shape[0])
    got = llamacpp.file_bytes_by_type(out)
    assert got == expected
    assert set(got) == {"Q8_0", "Q6_K", "Q4_K", "Q4_0", "F16", "BF16", "F32"}
    assert list(got.values()) == sorted(got.values(), reverse=True)  # largest first
    assert got["Q6_K"] == 320 * row_bytes("Q6_K", 256)  # lm_head [vocab 320, 256]
    assert got["F32"] == (2 * 4 + 1) * 256 * 4  # 2 norms per block, 4 blocks, the final norm
    assert sum(got.values()) < out.stat().st_size  # the header and the tokenizer are not tensor data
    with pytest.raises(EWQError, match="cannot read GGUF"):
        llamacpp.file_bytes_by_type(tmp_path / "missing.gguf")


# ---- with llama-cpp-python ----

def save_merge_tokenizer(directory) -> None:
    """The tests' byte tokenizer (ids 0..255 bytes, 256 end-of-text) plus two BPE merges: llama.cpp refuses a gpt2
    vocabulary without merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<|endoftext|>"] = 256
    vocab["Ġt"], vocab["he"] = 257, 258
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(HF directory, GGUF F32 of it): a tiny llama whose every tensor is float32 in the file."""
    pytest.importorskip("llama_cpp")
    from conftest import build_tiny

    d = build_tiny("llama", tmp_path_factory.mktemp("lcpp") / "m", seed=1, dtype=torch.float32)
    save_merge_tokenizer(d)
    out = d.parent / "m-f32.gguf"
    export_gguf(d, out, {}, default_type="F32", progress=False)
    return d, out


@pytest.fixture(scope="module")
def pair(tiny_gguf):
    from transformers import AutoModelForCausalLM

    d, out = tiny_gguf
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with llamacpp.LlamaCppModel(out, n_ctx=256, n_batch=64) as lm:  # n_batch < window: pieces are exercised
        yield hf, lm


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def test_logits_match_transformers_float32(pair):
    hf, lm = pair
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (3, 200))
    with torch.inference_mode():
        want = hf(ids).logits.float()
    got = lm(ids).logits
    assert got.shape == want.shape and got.dtype == torch.float32
    lp, lq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert kl.mean() < 1e-4 and kl.max() < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.98
    # each row is its own sequence: the same row alone gives the same logits
    assert torch.allclose(lm(ids[1:2]).logits[0], got[1], atol=1e-4)


def test_no_weight_repacking_on_a_cpu_with_amx(tiny_gguf, pair, monkeypatch):
    """llama.cpp's AMX kernel crashed EWQ's process on the first prompt on an AMX Xeon (a 64-token prompt over a
    Q4_0 file: SIGSEGV; docs/gguf.md): there the file loads without the repacked layouts, computing the same."""
    from ewq import probes

    _, lm = pair
    assert lm.config.weights_repacked == (not {"amx_int8", "amx_tile"} & probes.cpu_info()[1])
    monkeypatch.setattr(probes, "cpu_info", lambda: ("Some Xeon", {"avx2", "avx512f", "amx_tile", "amx_int8"}))
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(2))
    with llamacpp.LlamaCppModel(tiny_gguf[1], n_ctx=256, n_batch=64) as unpacked:
        assert unpacked.config.weights_repacked is False
        assert torch.allclose(unpacked(ids).logits, lm(ids).logits, atol=1e-4)


def test_quality_evaluate_runs_on_it(pair):
    from ewq import quality

    hf, lm = pair
    windows = torch.randint(0, 320, (5, 64), generator=torch.Generator().manual_seed(1))
    ref = quality.compute_reference(hf, windows, "cpu", top_k=32, progress=False)
    scores = quality.evaluate(lm, ref, "cpu", progress=False)
    assert scores["kl_mean"] < 1e-4 and scores["top1_agreement"] > 0.98 and scores["eval_tokens"] == 5 * 63


def test_generate_exact_greedy_and_streamer_contract(pair):
    from ewq.generate import generate_exact

    hf, lm = pair
    prompt = torch.tensor([[104, 101, 108, 108, 111, 32, 116]])
    prefill_s, decode_s, tokens = generate_exact(lm, prompt, 24, "cpu")
    assert len(tokens) == 24 and prefill_s > 0 and decode_s > 0
    _, _, want = generate_exact(hf, prompt, 24, "cpu")
    same = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(want))
    assert same >= 12, (tokens, want)  # float32 both ways: identical until a near-tie, if any

    rec = Recorder()
    out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                      do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1, streamer=rec,
                      pad_token_id=256)
    assert out.shape == (1, prompt.shape[1] + 5) and out.dtype == torch.long
    assert torch.equal(out[0, :7], prompt[0]) and out[0, 7:].tolist() == tokens[:5]
    assert torch.equal(rec.calls[0], prompt) and rec.calls[-1] == "end" and len(rec.calls) == 7
    assert [int(c) for c in rec.calls[1:-1]] == tokens[:5]
    # the cache is reset between calls: the same prompt gives the same tokens again
    assert lm.generate(prompt, max_new_tokens=5)[0, 7:].tolist() == tokens[:5]


def test_min_new_tokens_masks_eos_and_eos_stops_after_it(pair):
    from transformers import GenerationConfig

    _, lm = pair
    prompt = torch.tensor([[104, 101, 108, 108, 111]])
    first = lm.generate(prompt, max_new_tokens=3)[0, 5:].tolist()
    saved = lm.generation_config
    try:
        lm.generation_config = GenerationConfig(eos_token_id=first[0], pad_token_id=first[0])
        masked = lm.generate(prompt, max_new_tokens=3, min_new_tokens=3)[0, 5:].tolist()
        assert len(masked) == 3 and first[0] not in masked  # as transformers' min_new_tokens: EOS cannot win
        stopped = lm.generate(prompt, max_new_tokens=3)[0, 5:].tolist()
        assert stopped == [first[0]]  # without min_new_tokens an EOS ends the sequence
    finally:
        lm.generation_config = saved


def test_transformers_like_surface(pair, tiny_gguf):
    _, lm = pair
    assert lm.can_generate() and lm.eval() is lm and lm.to("cpu") is lm and lm.to(torch.device("cpu")) is lm
    assert lm.device == torch.device("cpu")
    assert lm.generation_config.eos_token_id == 256 and lm.generation_config.pad_token_id == 256
    cfg = lm.config
    assert cfg.vocab_size == 320 and cfg.num_hidden_layers == 4 and cfg.hidden_size == 128
    assert cfg.model_type == "llama" and cfg.n_threads == torch.get_num_threads()
    json.dumps(cfg.to_dict())
    assert llamacpp.file_bytes_by_type(tiny_gguf[1]) == {"F32": sum(
        int(t.n_bytes) for t in gguf.GGUFReader(tiny_gguf[1]).tensors)}


def test_refusals_are_one_line(pair, tmp_path):
    _, lm = pair
    ids = torch.tensor([[1, 2, 3]])
    cases = [
        (lambda: lm.to("cuda"), "CPU only"),
        (lambda: lm.to(torch.float16), "fixed by its GGUF"),
        (lambda: lm(ids, attention_mask=torch.tensor([[0, 1, 1]])), "no padding"),
        (lambda: lm(torch.tensor([[1, 320]])), r"\[0, 320\)"),
        (lambda: lm(torch.zeros(1, 257, dtype=torch.long)), "context of 256"),
        (lambda: lm.generate(ids, max_new_tokens=254), "do not fit"),
        (lambda: lm.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=2), "one sequence"),
        (lambda: lm.generate(ids, max_new_tokens=2, do_sample=True), "greedily"),
        (lambda: lm.generate(ids, max_new_tokens=2, num_beams=2), "greedily"),
        (lambda: lm.generate(ids, max_new_tokens=2, repetition_penalty=1.2), "repetition_penalty"),
        (lambda: llamacpp.LlamaCppModel(tmp_path / "none.gguf"), "does not exist"),
    ]
    for call, match in cases:
        with pytest.raises(EWQError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(EWQError, match="could not load"):
        llamacpp.LlamaCppModel(bad)
    assert lm.generate(ids, max_new_tokens=2).shape == (1, 5)  # still usable after the refusals
