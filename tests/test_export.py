"""python -m ewq.export gguf: a plan (llama.cpp's formats or the torch menu) written as a GGUF, read back with gguf-py;
and a llama.cpp plan made by main_cache_model.py --backend llama.cpp. No llama.cpp needed."""

import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ewq import export
from ewq.checkpoint import open_checkpoint
from ewq.common import run_cli
from ewq.ggml_quants import quantize_dequantize
from ewq.gguf_export import llama_unpermute
from ewq.plan import load_plan
from ewq.planning import make_plan

gguf = pytest.importorskip("gguf")

# a llama whose rows fit the k-quants (256) and the 32-blocks alike
KQ = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def run_export(plan, model, out, capsys, *extra):
    code = run_cli(export.main, ["gguf", "--plan", str(plan), "--model", str(model), "--out", str(out),
                                 "--no-progress", *extra])
    return code, capsys.readouterr()


def test_a_llama_cpp_plan_is_written_type_for_type(tiny_factory, tmp_path, capsys):
    model = tiny_factory("llama", **KQ)
    path, plan, _ = make_plan(str(model), method="sensitivity", granularity="matrix", backend="llama.cpp",
                              target_bits=5.5, out_dir=tmp_path, progress=False, calib_tokens=200)
    assert plan["other"]["matrices"] and set(plan["other"]["matrices"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert plan["size"]["avg_bits_per_weight"] <= 5.5 + 1e-9 and plan["checks"]["measured_kl"] > 0
    out = tmp_path / "plan.gguf"
    code, io = run_export(path, model, out, capsys)
    assert code == 0, io.err
    written = tensors(out)
    types = export.tensor_types(load_plan(path), open_checkpoint(model))
    gnames = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    with torch.no_grad():
        with safe_open(model / "model.safetensors", framework="pt") as f:
            for hf, ggml_type in types.items():
                block = hf.split(".")[2] if hf.startswith("model.layers.") else None
                kind = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                        "mlp.down_proj": "ffn_down"}
                name = gnames.get(hf) or f"blk.{block}.{kind['.'.join(hf.split('.')[3:5])]}.weight"
                t = written[name]
                assert t.tensor_type.name == ggml_type, (hf, t.tensor_type.name, ggml_type)
                w = f.get_tensor(hf).float()
                if hf.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary layout
                    heads = KQ["num_attention_heads"] if "q_proj" in hf else KQ["num_key_value_heads"]
                    got = llama_unpermute(torch.from_numpy(dequant(t)), heads, heads)
                else:
                    got = torch.from_numpy(dequant(t))
                # exactly the emulated rounding the sweep measured (the same quantizer, bit for bit)
                want = w if ggml_type in ("F16", "BF16") else quantize_dequantize(w, ggml_type)
                assert torch.allclose(got, want.to(got.dtype), atol=1e-3 if ggml_type in ("F16", "BF16") else 0), hf
    assert "wrote" in io.out and io.out.strip().splitlines()[-1] == str(out)


def dequant(t) -> np.ndarray:
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        a = np.asarray(t.data, dtype=np.float32)
    else:
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return a.reshape([int(n) for n in reversed(t.shape)]).astype(np.float32)


def test_a_torch_plan_becomes_q8_0_and_q4_0(tiny_factory, tmp_path, capsys):
    model = tiny_factory("llama")
    path = make_plan(str(model), out_dir=tmp_path, progress=False)[0]  # the entropy rule: raw / 8-bit / 4-bit
    plan = load_plan(path)
    code, io = run_export(path, model, tmp_path / "x.gguf", capsys)
    assert code == 0, io.err
    written = tensors(tmp_path / "x.gguf")
    for b in plan["blocks"]:
        want = {"raw": "F16", "8-bit": "Q8_0", "4-bit": "Q4_0"}[b["precision"]]
        assert written[f"blk.{b['index']}.ffn_up.weight"].tensor_type.name == want
    assert written["token_embd.weight"].tensor_type.name == "F16"  # a torch plan leaves embeddings raw


@pytest.mark.parametrize("case,message", [
    ("other-weights", "was made for other weights"),
    ("gpt2", "cannot be exported to GGUF here; supported: LlamaForCausalLM"),
    ("unwritable", "cannot write the GGUF file"),
    ("out-is-dir", "is a directory"),
])
def test_export_bad_input_is_one_line_and_leaves_nothing(tiny_factory, tmp_path, capsys, case, message):
    model = tiny_factory("llama")
    plan = make_plan(str(model), out_dir=tmp_path / "plans", progress=False)[0]
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    if case == "other-weights":
        model = tiny_factory("llama", seed=1)
    elif case == "gpt2":
        model = tiny_factory("gpt2")
        plan = make_plan(str(model), out_dir=tmp_path / "plans", progress=False)[0]
    elif case == "unwritable":
        out = tmp_path / "missing-file-as-dir" / "x.gguf"
        (tmp_path / "missing-file-as-dir").write_text("a file, not a folder")
    elif case == "out-is-dir":
        out = out.parent
    code, io = run_export(plan, model, out, capsys)
    assert code == 2 and message in io.err and io.err.count("\n") == 1 and "Traceback" not in io.err
    assert not any(p.suffix in (".gguf", ".tmp") for p in (tmp_path / "out").iterdir())


def test_benchmark_without_llama_cpp_says_how_to_build_it(tiny_factory, tmp_path, capsys, monkeypatch):
    import benchmark

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without the optional extra
    argv = ["--model", str(tiny_factory("llama")), "--plan", "uniform-8bit", "--backend", "llama.cpp",
            "--out-dir", str(tmp_path / "r"), "--plans-dir", str(tmp_path / "q"), "--no-progress"]
    assert run_cli(benchmark.main, argv) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "pip" in err and "CMAKE_ARGS" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))
    assert not (tmp_path / "q").exists() or not list((tmp_path / "q").glob("*.gguf"))

