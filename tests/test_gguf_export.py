"""GGUF export (ewq.gguf_export): per-tensor ggml types, read back with gguf-py; no llama.cpp needed."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ewq.common import EWQError
from ewq.gguf_export import (
    KQUANT_TYPES,
    export_gguf,
    llama_permute,
    llama_quantize_args,
    llama_unpermute,
    pre_tokenizer_by_structure,
)

gguf = pytest.importorskip("gguf")

# worst |dequantized - original| / max|row| a format allows: half a step, or a whole step where ggml's symmetric
# formats clamp the far end (Q4_0: d = max/-8, so +|max| lands on 8 and is clamped to 7), plus a 16-bit scale
TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q5_0": 0.07, "Q5_1": 0.04, "Q4_0": 0.13, "Q4_1": 0.075}


def weights(model_dir, file="model.safetensors"):
    with safe_open(model_dir / file, framework="pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118


def read(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def as_float(t) -> np.ndarray:
    """A tensor of the file as float32 in the HF [out, in] layout."""
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        a = np.asarray(t.data, dtype=np.float32)
    else:
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return a.reshape([int(n) for n in reversed(t.shape)])


def check_close(name, got, want, qtype):
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape, name
    if want.ndim == 1:
        want, got = want[None], got[None]
    err = np.abs(got - want).max(axis=1)
    scale = np.abs(want).max(axis=1) + 1e-12
    assert (err / scale).max() <= TOL[qtype], (name, qtype, float((err / scale).max()))


def no_leftovers(directory):
    return [p.name for p in directory.iterdir()]


MIXED = {
    "self_attn.q_proj.weight": "Q8_0", "self_attn.k_proj.weight": "Q4_0", "self_attn.v_proj.weight": "Q5_1",
    "self_attn.o_proj.weight": "Q5_0", "mlp.gate_proj.weight": "Q4_1", "mlp.up_proj.weight": "F16",
    "mlp.down_proj.weight": "BF16",
}


def layer_plan(names, per_matrix):
    return {n: t for n in names for suffix, t in per_matrix.items() if n.endswith(suffix) and ".layers." in n}


def test_llama_mixed_types_hparams_and_tokenizer(tiny_factory, tmp_path):
    src = tiny_factory("llama")
    w = weights(src)
    plan = {**layer_plan(w, MIXED), "model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q4_0"}
    plan["model.layers.1.self_attn.q_proj.weight"] = "Q4_1"  # per matrix, not per kind
    out = tmp_path / "m.gguf"
    r = export_gguf(src, out, plan, default_type=None, progress=False)
    assert r["arch"] == "llama" and r["pre_tokenizer"] == "gpt-2" and not r["pending_kquants"]
    assert r["llama_quantize_args"] == [] and no_leftovers(tmp_path) == ["m.gguf"]

    fields, tensors = read(out)
    cfg = json.loads((src / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 4 and fields["llama.context_length"] == 256
    assert fields["llama.embedding_length"] == 128 and fields["llama.feed_forward_length"] == 256
    assert fields["llama.attention.head_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 64 and fields["llama.vocab_size"] == 320
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.get("rope_theta", 10000.0))
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert "general.file_type" in fields and fields["general.quantization_version"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 320 and len(fields["tokenizer.ggml.token_type"]) == 320
    assert fields["tokenizer.ggml.tokens"][256] == "<|endoftext|>" and fields["tokenizer.ggml.eos_token_id"] == 256
    assert any("no BPE merges" in m for m in r["warnings"])  # the byte tokenizer has none

    # every tensor in its requested type, values within the format's error of the original weights
    assert len(tensors) == len(w)
    for hf, gname in r["gguf_names"].items():
        t = tensors[gname]
        want_type = plan.get(hf, "F32")
        assert t.tensor_type.name == want_type, (hf, t.tensor_type.name)
        got = as_float(t)
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            got = llama_unpermute(got, 2, 2)
        check_close(hf, got, w[hf], want_type)
    assert "output.weight" in tensors and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_q_k_rows_are_permuted_as_llama_cpp_expects(tiny_factory, tmp_path):
    src = tiny_factory("llama")
    w = weights(src)
    out = tmp_path / "f32.gguf"
    export_gguf(src, out, {}, default_type="F32", progress=False)
    _, tensors = read(out)
    q = w["model.layers.2.self_attn.q_proj.weight"]
    got = as_float(tensors["blk.2.attn_q.weight"])
    assert np.array_equal(got, llama_permute(q, 2, 2).numpy()) and not np.array_equal(got, q.numpy())
    assert np.array_equal(llama_unpermute(llama_permute(q, 4, 2), 4, 2), q)  # GQA: k rows use the kv heads
    assert np.array_equal(as_float(tensors["blk.2.attn_v.weight"]), w["model.layers.2.self_attn.v_proj.weight"])


def test_qwen2_is_not_permuted_and_keeps_biases_f32(tiny_factory, tmp_path):
    src = tiny_factory("qwen2")
    w = weights(src)
    out = tmp_path / "q.gguf"
    r = export_gguf(src, out, {"model.layers.0.self_attn.q_proj.weight": "Q8_0"}, default_type="F16",
                    progress=False)
    fields, tensors = read(out)
    assert r["arch"] == "qwen2" and fields["general.architecture"] == "qwen2"
    assert fields["qwen2.block_count"] == 3 and fields["qwen2.attention.head_count_kv"] == 2
    assert "qwen2.vocab_size" not in fields  # Qwen2Model writes neither vocab_size nor rope dimension count
    assert fields["tokenizer.ggml.pre"] == "qwen2"  # transformers runs Qwen2's regex for a qwen2 checkpoint
    check_close("q", as_float(tensors["blk.0.attn_q.weight"]), w["model.layers.0.self_attn.q_proj.weight"], "Q8_0")
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.1.attn_q.weight"].tensor_type.name == "F16"
    bias = tensors["blk.0.attn_q.bias"]
    assert bias.tensor_type.name == "F32"
    assert np.array_equal(as_float(bias), w["model.layers.0.self_attn.q_proj.bias"].numpy())


def test_tied_embeddings_write_no_output_tensor(tiny_factory, tmp_path):
    src = tiny_factory("qwen2", tie_word_embeddings=True)
    out = tmp_path / "t.gguf"
    export_gguf(src, out, {}, progress=False)
    _, tensors = read(out)
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type.name == "BF16"
    with pytest.raises(EWQError, match="tied"):
        export_gguf(src, tmp_path / "u.gguf", {"lm_head.weight": "Q8_0"}, progress=False)


def simulate_llama_quantize(args, tensors):
    """llama-quantize's type choice for our arguments (src/llama-quant.cpp llama_tensor_get_type, --pure)."""
    it = iter(args)
    patterns, embd, out, pos = [], None, None, []
    for a in it:
        if a == "--tensor-type":
            pat, typ = next(it).split("=", 1)
            patterns.append((re.compile(pat.lower()), typ.upper()))
        elif a == "--token-embedding-type":
            embd = next(it).upper()
        elif a == "--output-tensor-type":
            out = next(it).upper()
        elif not a.startswith("--"):
            pos.append(a)
    base = pos[2]
    result = {}
    for name, cur in tensors.items():
        if name.endswith("_norm.weight") or not name.endswith("weight") or len(cur[1]) < 2:
            result[name] = cur[0]
        elif name == "token_embd.weight" and embd:
            result[name] = embd
        elif name == "output.weight" and out:
            result[name] = out
        else:
            result[name] = next((t for p, t in patterns if p.search(name)), base)
    return result


def test_kquants_wait_for_llama_quantize_with_exact_arguments(tiny_factory, tmp_path):
    src = tiny_factory("llama", hidden_size=256, intermediate_size=512)  # k-quants need rows of 256
    w = weights(src)
    plan = {n: ("Q6_K" if i % 2 else "Q4_K") for i, n in enumerate(sorted(layer_plan(w, {"mlp.down_proj.weight": 1})))}
    plan.update(layer_plan(w, {"self_attn.q_proj.weight": "Q5_K", "self_attn.v_proj.weight": "Q8_0"}))
    plan["model.layers.0.mlp.up_proj.weight"] = "Q2_K"
    plan["model.embed_tokens.weight"] = "Q3_K"
    plan["lm_head.weight"] = "Q6_K"
    out = tmp_path / "k.gguf"
    r = export_gguf(src, out, plan, default_type="Q8_0", progress=False)
    assert set(r["pending_kquants"]) == {n for n, t in plan.items() if t in KQUANT_TYPES}
    assert r["kquant_intermediate"] == "F16"  # the checkpoint is fp16: lossless
    _, tensors = read(out)
    for hf, t in r["written_types"].items():
        g = tensors[r["gguf_names"][hf]]
        assert g.tensor_type.name == t
        if hf in r["pending_kquants"]:
            assert t == "F16"
            got = as_float(g)
            if "q_proj" in hf:
                got = llama_unpermute(got, 2, 2)
            assert np.array_equal(got, w[hf].numpy())  # written losslessly, for llama-quantize to quantize

    args = r["llama_quantize_args"]
    assert args[:1] == ["--pure"] and "--allow-requantize" not in args
    assert args[-3:] == [str(out), str(out.with_name("k-plan.gguf")), "Q8_0"]
    assert args[args.index("--token-embedding-type") + 1] == "q3_K"
    assert args[args.index("--output-tensor-type") + 1] == "q6_K"
    assert r["llama_quantize_command"].startswith("llama-quantize --pure ")
    current = {t.name: (t.tensor_type.name, list(t.shape)) for t in tensors.values()}
    final = simulate_llama_quantize(args, current)
    want = {r["gguf_names"][hf]: t for hf, t in r["final_types"].items()}
    assert final == want
    # the already-final quantized tensors are pinned to their own type: llama-quantize copies them
    assert all(final[n] == cur[0] for n, cur in current.items() if cur[0] not in ("F16", "BF16", "F32"))


def test_llama_quantize_args_for_a_partial_plan_leave_the_rest_to_the_positional_type():
    args = llama_quantize_args({"model.layers.3.mlp.down_proj.weight": "Q6_K",
                                "model.layers.10.mlp.down_proj.weight": "Q6_K",
                                "model.layers.3.self_attn.q_proj.weight": "bf16"}, "a.gguf", "b.gguf",
                               base_type="Q4_K", nthreads=2)
    assert args == ["--pure", "--tensor-type", r"^blk\.3\.attn_q\.weight$=bf16",
                    "--tensor-type", r"^blk\.(3|10)\.ffn_down\.weight$=q6_K", "a.gguf", "b.gguf", "Q4_K", "2"]
    assert not re.search(r"^blk\.(3|10)\.ffn_down\.weight$", "blk.1.ffn_down.weight")
    assert llama_quantize_args({"model.layers.0.mlp.up_proj.weight": "F16"}) == []


def test_rows_that_do_not_fit_fall_back_as_llama_quantize_does(tiny_factory, tmp_path):
    src = tiny_factory("llama")  # rows of 128 (hidden size): no k-quant fits; ffn_down's rows of 256 do
    plan = {"model.layers.0.mlp.up_proj.weight": "Q4_K", "model.layers.0.self_attn.o_proj.weight": "Q6_K",
            "model.layers.1.mlp.up_proj.weight": "Q2_K", "model.layers.1.self_attn.v_proj.weight": "Q5_K",
            "model.layers.1.mlp.down_proj.weight": "Q3_K"}
    r = export_gguf(src, tmp_path / "f.gguf", plan, progress=False)
    assert r["fallbacks"] == {"model.layers.0.mlp.up_proj.weight": ("Q4_K", "Q5_0"),
                              "model.layers.0.self_attn.o_proj.weight": ("Q6_K", "Q8_0"),
                              "model.layers.1.mlp.up_proj.weight": ("Q2_K", "Q4_0"),
                              "model.layers.1.self_attn.v_proj.weight": ("Q5_K", "Q5_1")}
    assert r["pending_kquants"] == {"model.layers.1.mlp.down_proj.weight": "Q3_K"}
    _, tensors = read(tmp_path / "f.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q5_0"
    with pytest.raises(EWQError, match="not a multiple of 256"):
        export_gguf(src, tmp_path / "s.gguf", plan, progress=False, strict=True)
    assert sorted(no_leftovers(tmp_path)) == ["f.gguf"]


def test_quantize_fn_writes_kquants_natively(tiny_factory, tmp_path):
    src = tiny_factory("llama", hidden_size=256, intermediate_size=512)
    calls = []

    def zeros(weight, qtype):  # a stand-in for a real k-quant packer: all-zero blocks dequantize to 0
        calls.append((qtype, weight.dtype, tuple(weight.shape)))
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        return np.zeros(weight.shape[0] * weight.shape[1] // bs * ts, np.uint8)

    out = tmp_path / "n.gguf"
    r = export_gguf(src, out, {"model.layers.1.mlp.gate_proj.weight": "Q6_K"}, quantize_fn=zeros, progress=False)
    assert calls == [("Q6_K", torch.float32, (512, 256))]
    assert not r["pending_kquants"] and r["llama_quantize_args"] == []
    _, tensors = read(out)
    t = tensors["blk.1.ffn_gate.weight"]
    assert t.tensor_type.name == "Q6_K" and not as_float(t).any()
    with pytest.raises(EWQError, match="bytes"):
        export_gguf(src, tmp_path / "bad.gguf", {"model.layers.1.mlp.gate_proj.weight": "Q4_K"},
                    quantize_fn=lambda w, t: b"\0" * 7, progress=False)
    assert sorted(no_leftovers(tmp_path)) == ["n.gguf"]


def test_interrupt_leaves_no_file(tiny_factory, tmp_path):
    src = tiny_factory("llama", hidden_size=256, intermediate_size=512)

    def interrupt(weight, qtype):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(src, tmp_path / "i.gguf", {"model.layers.2.mlp.up_proj.weight": "Q4_K"},
                    quantize_fn=interrupt, progress=False)
    assert no_leftovers(tmp_path) == []


def one_line_error(fn, *args, **kw):
    with pytest.raises(EWQError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_refusals_are_one_line_and_leave_nothing(tiny_factory, tiny_copy, tmp_path):
    llama = tiny_factory("llama")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    msg = one_line_error(export_gguf, tiny_factory("gpt2"), out_dir / "g.gguf", {}, progress=False)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "cannot write" in one_line_error(export_gguf, llama, blocker / "x.gguf", {}, progress=False)
    msg = one_line_error(export_gguf, llama, out_dir / "m.gguf",
                         {"model.layers.9.self_attn.q_proj.weight": "Q8_0"}, progress=False)
    assert "model.layers.9.self_attn.q_proj.weight" in msg
    assert "misses" in one_line_error(export_gguf, llama, out_dir / "m.gguf",
                                      {"model.layers.0.mlp.up_proj.weight": "Q8_0"}, default_type=None,
                                      progress=False)
    assert "Q4_K_M" in one_line_error(export_gguf, llama, out_dir / "m.gguf",
                                      {"model.layers.0.mlp.up_proj.weight": "Q4_K_M"}, progress=False)
    assert "F32" in one_line_error(export_gguf, llama, out_dir / "m.gguf",
                                   {"model.norm.weight": "Q8_0"}, progress=False)
    spm = tiny_copy("llama")
    (spm / "tokenizer.model").write_bytes(b"\0")
    assert "SentencePiece" in one_line_error(export_gguf, spm, out_dir / "m.gguf", {}, progress=False)
    assert no_leftovers(out_dir) == []


def test_unknown_pre_tokenizer_is_refused_unless_named(tiny_copy, tmp_path):
    src = tiny_copy("llama")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Isolated"}, tok["pre_tokenizer"]]}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    assert "pre-tokenizer" in one_line_error(export_gguf, src, tmp_path / "p.gguf", {}, progress=False)
    r = export_gguf(src, tmp_path / "p.gguf", {}, progress=False, pre_tokenizer="gpt-2")
    assert r["pre_tokenizer"] == "gpt-2" and r["pre_tokenizer_source"] == "given"


def test_pre_tokenizer_structures():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_by_structure({"normalizer": None, "pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_by_structure({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) \
        == "smollm"
    assert pre_tokenizer_by_structure({"pre_tokenizer": {**byte_level, "add_prefix_space": True}}) is None
    assert pre_tokenizer_by_structure({"normalizer": {"type": "Lowercase"}, "pre_tokenizer": byte_level}) is None


def test_sharded_checkpoint_with_grouped_kv_heads(tmp_path):
    from ewq.synthetic import save_byte_tokenizer, write_random_checkpoint

    src = write_random_checkpoint({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                                   "vocab_size": 320, "tie_word_embeddings": False}, tmp_path / "src",
                                  shard_bytes=100_000)
    save_byte_tokenizer(src)
    assert (src / "model.safetensors.index.json").exists()
    out = tmp_path / "s.gguf"
    r = export_gguf(src, out, {"model.layers.1.self_attn.k_proj.weight": "Q8_0"}, default_type="F32", progress=False)
    fields, tensors = read(out)
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 1
    w = {}
    for part in sorted(src.glob("model-*.safetensors")):
        w.update(weights(src, part.name))
    assert len(tensors) == len(w) == len(r["gguf_names"])
    k = w["model.layers.0.self_attn.k_proj.weight"]  # 32 rows: one kv head of 32
    assert np.array_equal(llama_unpermute(as_float(tensors["blk.0.attn_k.weight"]), 4, 1), k.numpy())
    check_close("k", llama_unpermute(as_float(tensors["blk.1.attn_k.weight"]), 4, 1),
                w["model.layers.1.self_attn.k_proj.weight"], "Q8_0")
