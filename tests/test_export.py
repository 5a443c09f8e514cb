"""python -m ewq.export gguf: a plan (llama.cpp's formats or the torch menu) written as a GGUF, read back with gguf-py;
and a llama.cpp plan made by main_cache_model.py --backend llama.cpp. No llama.cpp needed."""

import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ewq import export
from ewq import presets
from ewq.checkpoint import open_checkpoint
from ewq.common import EWQError, run_cli, write_json_atomic
from ewq.ggml_quants import quantize_dequantize
from ewq.gguf_export import llama_unpermute
from ewq.imatrix import load_imatrix
from ewq.backends.llamacpp import DECODE_COST, DECODE_COST_AVX512_AMX, builtin_table_warning, decode_cost_table
from ewq.plan import load_plan, plan_hash
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


def test_a_llama_cpp_plan_is_written_type_for_type(tiny_factory, tmp_path, capsys, monkeypatch):
    from ewq import sensitivity

    monkeypatch.setattr(sensitivity, "RANDOM_PLANS", 1)  # the random plans beside each plan are not what this checks
    model = tiny_factory("llama", **KQ)
    path, plan, _ = make_plan(str(model), method="sensitivity", granularity="matrix", backend="llama.cpp",
                              target_bits=5.5, out_dir=tmp_path, progress=False, calib_tokens=200)
    assert plan["other"]["matrices"] and set(plan["other"]["matrices"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert plan["size"]["avg_bits_per_weight"] <= 5.5 + 1e-9 and plan["checks"]["measured_kl"] > 0
    # random weights sit on no Q4_1 grid: the float-minimum formats are measured beside the default menu
    assert {"Q5_1", "Q4_1"} <= set(plan["method"]["formats"]["menu"])
    out = tmp_path / "plan.gguf"
    code, io = run_export(path, model, out, capsys)
    assert code == 0, io.err
    written = tensors(out)
    types = export.tensor_types(load_plan(path), open_checkpoint(model))
    gnames = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    # rounded with the importance matrix the sweep measured with (EWQ's own, from the calibration text), as
    # llama-quantize --imatrix rounds; recorded in the file as llama-quantize records it
    importance = load_imatrix(plan["method"]["imatrix"]["file"]).importance
    assert set(importance) == {n for n in written if n.startswith("blk.") and n.endswith(("_q.weight", "_k.weight",
                               "_v.weight", "_output.weight", "_gate.weight", "_up.weight", "_down.weight"))}
    meta = gguf.GGUFReader(str(out)).fields
    assert meta["quantize.imatrix.entries_count"].parts[-1][0] == len(importance)
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
                want = w if ggml_type in ("F16", "BF16") else quantize_dequantize(w, ggml_type,
                                                                                   importance=importance.get(name))
                assert torch.allclose(got, want.to(got.dtype), atol=1e-3 if ggml_type in ("F16", "BF16") else 0), hf
    assert "wrote" in io.out and io.out.strip().splitlines()[-1] == str(out)

    # one command from checkpoint to GGUF (the sweep above is cached in tmp_path and reused): no larger than the file
    # llama-quantize's Q4_K_M would give, and it says its size, bits per weight and plan
    from ewq import probes

    monkeypatch.setattr(probes, "cpu_info", lambda: ("Some CPU", {"avx2", "fma"}))  # the speed limit's table: AVX2's
    out = tmp_path / "F.gguf"
    code = run_cli(export.main, ["gguf", "--model", str(model), "--target", "Q4_K_M", "--out", str(out),
                                 "--plans-dir", str(tmp_path), "--calib-tokens", "200", "--no-progress"])
    io = capsys.readouterr()
    assert code == 0, io.err
    plan_line = next(line for line in io.out.splitlines() if line.startswith("plan: "))
    plan = load_plan(plan_line[len("plan: "):])
    # importance-weighted rounding (the default) aims at the preset as llama-quantize makes it with --imatrix
    stats = presets.file_stats(out)
    target = presets.preset_size(model, "Q4_K_M", plan["method"]["target"]["imatrix"])
    assert 0.95 * target.file_bytes < stats["file_bytes"] <= target.file_bytes
    assert plan["method"]["name"] == "sensitivity" and plan["method"]["target"]["file_bytes"] == target.file_bytes
    assert f"{stats['bpw']:.4f} bits per weight" in io.out and io.out.strip().splitlines()[-1] == str(out)
    # ... and, by default, no slower to decode than the preset's file by the kernel cost table, read from the file
    shape = presets.model_shape(model)
    decode = presets.decode_weights(shape)
    # this llama has its own head: a token reads one row of the embeddings and multiplies through everything else
    assert set(decode) == {t.name for t in shape.tensors if len(t.shape) == 2} - {"token_embd.weight"}

    def decode_time(path, table):
        written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        return sum(n * table[written[k]] for k, n in decode.items())

    assert decode_time(out, DECODE_COST) <= sum(n * DECODE_COST[target.types[k]] for k, n in decode.items())
    assert plan["method"]["target"]["speed"] == "preset" and plan["method"]["decode_cost"]["plan"] <= 1.0
    assert "bench/decode_cost.py" not in io.err  # an AVX2 CPU: the table was measured on one
    # the built-in table is chosen by the CPU's flags: an AVX-512 + AMX Xeon has its own (its formats order otherwise)
    amx = {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}
    monkeypatch.setattr(probes, "cpu_info", lambda: ("Some CPU", amx))
    cpu_out = tmp_path / "amx.gguf"
    code = run_cli(export.main, ["gguf", "--model", str(model), "--target", "Q4_K_M", "--out", str(cpu_out),
                                 "--plans-dir", str(tmp_path), "--calib-tokens", "200", "--no-progress"])
    io = capsys.readouterr()
    assert code == 0 and "bench/decode_cost.py" not in io.err, io.err
    cpu_plan = load_plan(next(line for line in io.out.splitlines() if line.startswith("plan: "))[len("plan: "):])
    assert cpu_plan["method"]["target"]["decode_cost"]["table"] == DECODE_COST_AVX512_AMX
    assert decode_time(cpu_out, DECODE_COST_AVX512_AMX) <= sum(n * DECODE_COST_AVX512_AMX[target.types[k]]
                                                               for k, n in decode.items())
    assert cpu_plan["run"]["sensitivity_cached"]
    # a CPU of no measured family (AVX-512 without AMX) is timed by the AVX2 table and told to measure its own
    monkeypatch.setattr(probes, "cpu_info", lambda: ("Some CPU", {"avx2", "avx512f"}))
    assert decode_cost_table()["table"] == DECODE_COST
    assert "bench/decode_cost.py" in builtin_table_warning() and "--decode-cost" in builtin_table_warning()
    # --speed any: the size is the only limit; another plan (its own name), the sweep reused
    code = run_cli(export.main, ["gguf", "--model", str(model), "--target", "Q4_K_M", "--out", str(tmp_path / "any.gguf"),
                                 "--plans-dir", str(tmp_path), "--calib-tokens", "200", "--no-progress", "--speed", "any"])
    io = capsys.readouterr()
    assert code == 0, io.err
    any_plan = load_plan(next(line for line in io.out.splitlines() if line.startswith("plan: "))[len("plan: "):])
    assert any_plan["method"]["target"]["speed"] == "any" and "decode_cost" not in any_plan["method"]
    assert any_plan["run"]["sensitivity_cached"] and plan_hash(any_plan) != plan_hash(plan)
    # --decode-cost FILE: the limit timed by the kernel costs measured on the CPU the file will run on (here a CPU
    # whose k-quant and IQ4_XS kernels are 4x faster than this table's, relative to Q4_0, Q5_0, Q8_0, IQ4_NL)
    fast = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS")
    measured = {f: round(c * (0.25 if f in fast else 1.0), 4) for f, c in DECODE_COST.items()}
    table = write_json_atomic(tmp_path / "decode_cost.json", {
        "schema_version": 1, "cpu": {"model_name": "Other CPU", "flags": {"avx512f": True}},
        "formats": [{"format": f, "cost_vs_q4_0_mean": c} for f, c in measured.items()]})
    code = run_cli(export.main, ["gguf", "--model", str(model), "--target", "Q4_K_M", "--out", str(tmp_path / "dc.gguf"),
                                 "--plans-dir", str(tmp_path), "--calib-tokens", "200", "--no-progress",
                                 "--decode-cost", str(table)])
    io = capsys.readouterr()
    assert code == 0, io.err
    dc_plan = load_plan(next(line for line in io.out.splitlines() if line.startswith("plan: "))[len("plan: "):])
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "dc.gguf").tensors}
    timed = sum(n * measured[written[k]] for k, n in decode.items())
    preset_time = sum(n * measured[target.types[k]] for k, n in decode.items())
    assert timed <= preset_time and dc_plan["method"]["decode_cost"]["plan"] == pytest.approx(timed / preset_time,
                                                                                              abs=1e-3)
    assert dc_plan["method"]["target"]["decode_cost"]["table"] == measured and plan_hash(dc_plan) != plan_hash(plan)
    assert dc_plan["method"]["decode_cost"]["table"].startswith("measured: Other CPU") and "Other CPU" in io.out
    assert "bench/decode_cost.py" not in io.err  # (the CPU is still the AVX-512 one patched in above)
    # a measured table without a format the plan may choose: refused, not silently unlimited
    partial = write_json_atomic(tmp_path / "partial.json", {
        "schema_version": 1, "formats": [{"format": "Q4_0", "cost_vs_q4_0_mean": 1.0}]})
    code = run_cli(export.main, ["gguf", "--model", str(model), "--target", "Q4_K_M", "--out", str(tmp_path / "p.gguf"),
                                 "--plans-dir", str(tmp_path), "--calib-tokens", "200", "--no-progress",
                                 "--decode-cost", str(partial)])
    err = capsys.readouterr().err
    assert code == 2 and "the table has no cost for" in err and err.count("\n") == 1 and not (tmp_path / "p.gguf").exists()


def test_a_planned_file_is_never_larger_than_its_target(tiny_factory, tmp_path, capsys):
    """--target PRESET / --target-bpw B: the GGUF EWQ writes is within the file llama-quantize would write (header,
    padding and norms counted) and within B bits per weight as llama-quantize counts them."""
    model = tiny_factory("llama", **KQ)
    for preset in ("Q6_K", "Q4_K_M"):
        path = make_plan(str(model), method="position", granularity="matrix", backend="llama.cpp", target=preset,
                         out_dir=tmp_path, progress=False)[0]
        code, io = run_export(path, model, tmp_path / f"{preset}.gguf", capsys)
        assert code == 0, io.err
        size = (tmp_path / f"{preset}.gguf").stat().st_size
        assert 0.9 * presets.preset_size(model, preset).file_bytes < size <= presets.preset_size(model, preset).file_bytes
    path = make_plan(str(model), method="position", granularity="matrix", backend="llama.cpp", target_bpw=5.0,
                     out_dir=tmp_path, progress=False)[0]
    assert run_export(path, model, tmp_path / "bpw.gguf", capsys)[0] == 0
    assert 4.8 < presets.file_stats(tmp_path / "bpw.gguf")["bpw"] <= 5.0


def test_the_3_bit_i_quants_are_written_and_offered_to_their_presets(tiny_factory, tmp_path, capsys):
    """IQ3_XXS / IQ3_S: a plan naming them is written type for type, as ggml rounds them;
    a plan sized by an IQ3/IQ2 preset offers them by default, the other presets do not (they are slow to sweep)."""
    model = tiny_factory("llama", **KQ)
    path, plan, _ = make_plan(str(model), method="position", granularity="matrix", backend="llama.cpp",
                              target_bpw=3.4, formats=("IQ3_S", "IQ3_XXS", "IQ4_NL"), out_dir=tmp_path,
                              progress=False, calib_tokens=200)
    assert {"IQ3_S", "IQ3_XXS"} <= set(plan["matrix_counts"])
    out = tmp_path / "iq3.gguf"
    code, io = run_export(path, model, out, capsys)
    assert code == 0, io.err
    assert "imatrix" not in plan["method"]  # a position plan measured nothing: plain rounding
    types = export.tensor_types(load_plan(path), open_checkpoint(model))
    written = tensors(out)
    with safe_open(model / "model.safetensors", framework="pt") as f:
        for layer in (0, 1):
            hf = f"model.layers.{layer}.mlp.down_proj.weight"
            t = written[f"blk.{layer}.ffn_down.weight"]
            assert t.tensor_type.name == types[hf]
            want = quantize_dequantize(f.get_tensor(hf), types[hf])
            np.testing.assert_array_equal(dequant(t), want.numpy())
    menu = lambda preset: make_plan(str(model), method="position", granularity="matrix", backend="llama.cpp",  # noqa
                                    target=preset, out_dir=tmp_path, progress=False)[1]["method"]["formats"]["menu"]
    assert {"IQ3_XXS", "IQ3_S"} <= set(menu("IQ3_M")) and not {"IQ3_XXS", "IQ3_S"} & set(menu("Q3_K_M"))


def test_iq2_xs_is_written_only_with_importance(tiny_factory, tmp_path, capsys):
    """IQ2_XS, which ggml rounds only with an importance matrix: never offered to the embeddings, refused for a plan
    rounded without importance, refused by the exporter where the importance has no entry (one line, nothing
    written), and written as ggml rounds it when an importance matrix covers it; IQ2 presets offer it by default."""
    from ewq.imatrix import Imatrix, save_imatrix

    model = tiny_factory("llama", **KQ)
    kwargs = dict(method="position", granularity="matrix", backend="llama.cpp", out_dir=tmp_path, progress=False)
    with pytest.raises(EWQError, match="IQ2_XS is rounded only with an importance matrix.*--no-imatrix"):
        make_plan(str(model), target_bpw=3.5, formats=("IQ2_XS", "IQ4_NL"), imatrix="none", **kwargs)
    path, plan, _ = make_plan(str(model), target_bpw=3.5, formats=("IQ2_XS", "IQ4_NL"), **kwargs)
    assert "IQ2_XS" in plan["matrix_counts"] and "IQ2_XS" not in plan["other"]["matrices"].values()
    out = tmp_path / "iq2.gguf"
    code, io = run_export(path, model, out, capsys)  # a position plan measured nothing: no importance recorded
    assert code == 2 and "ggml rounds that type only with an importance matrix" in io.err and not out.exists()
    blocks = {t.name: t.shape for t in presets.model_shape(model).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    imp = {n: (np.arange(s[-1], dtype=np.float32) % 7 + 1) for n, s in blocks.items()}
    imatrix = save_imatrix(Imatrix(sums=imp, counts={n: 1 for n in imp}, datasets=["t"], chunk_count=1,
                                   chunk_size=1), tmp_path / "imatrix.gguf")
    code, io = run_export(path, model, out, capsys, "--imatrix", str(imatrix))
    assert code == 0, io.err
    types = export.tensor_types(load_plan(path), open_checkpoint(model))
    written = tensors(out)
    checked = 0
    with safe_open(model / "model.safetensors", framework="pt") as f:
        for layer in (0, 1):
            hf = f"model.layers.{layer}.mlp.down_proj.weight"
            t = written[f"blk.{layer}.ffn_down.weight"]
            assert t.tensor_type.name == types[hf]
            if types[hf] == "IQ2_XS":
                want = quantize_dequantize(f.get_tensor(hf), "IQ2_XS", importance=imp[f"blk.{layer}.ffn_down.weight"])
                np.testing.assert_array_equal(dequant(t), want.numpy())
                checked += 1
    assert checked
    menu = lambda preset: make_plan(str(model), target=preset, **kwargs)[1]["method"]["formats"]["menu"]  # noqa
    assert "IQ2_XS" in menu("IQ2_XS") and "IQ2_XS" not in menu("IQ3_M")


@pytest.mark.parametrize("args,message", [
    (["--target-bpw", "1.0"], "the size target cannot be met: the smallest GGUF the formats"),
    (["--target", "Q4_K_M", "--formats", "Q8_0"], "the smallest GGUF the formats Q8_0 allow"),
    (["--target", "Q4_K_M", "--formats", "q8_0,Q7_K"], "--formats names Q7_K; llama.cpp's formats here are"),
    (["--target", "Q9_K"], "unknown llama-quantize preset 'Q9_K'"),
    (["--target", "Q4_K_M", "--speed", "fast"], "--speed takes preset, any, or the fraction of the preset's"),
    (["--target-bpw", "5", "--speed", "0.9"], "--speed compares the file's decode speed with a preset's"),
    (["--target-bpw", "-1"], "--target-bpw must be a positive number"),
    ([], "give --plan PLAN, or --target PRESET"),
    (["--target", "Q4_K_M", "--llama-quantize-args"], "cannot meet a size target"),
    (["--target-bpw", "5", "--decode-cost", "decode_cost.json"], "--decode-cost times the file against its preset's"),
    (["--target", "Q4_K_M", "--decode-cost", "no_such.json"], "--decode-cost no_such.json: no such file"),
    (["--target", "Q4_K_M", "--decode-cost", "README.md"], "is not a decode cost table"),
])
def test_a_target_that_cannot_be_met_is_one_line_and_writes_nothing(tiny_factory, tmp_path, capsys, args, message):
    model = tiny_factory("llama", **KQ)
    code = run_cli(export.main, ["gguf", "--model", str(model), "--out", str(tmp_path / "x.gguf"), "--no-progress",
                                 "--plans-dir", str(tmp_path / "plans"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*part"))
    assert not (tmp_path / "plans").exists() or not list((tmp_path / "plans").glob("quant_plan_*.json"))


def test_a_format_a_tensor_cannot_take_is_refused(tiny_factory, tmp_path, capsys):
    """A plan (edited by hand) naming Q4_K for a matrix whose rows of 128 are not whole 256-blocks: one line, exit 2,
    no file; and --target with a torch backend or beside --plan is refused the same way."""
    model = tiny_factory("llama")
    path = make_plan(str(model), method="position", granularity="matrix", backend="llama.cpp", target_bpw=6.0,
                     out_dir=tmp_path, progress=False)[0]
    plan = load_plan(path)
    plan["blocks"][0]["matrices"] = {**(plan["blocks"][0].get("matrices") or {}), "self_attn.q_proj": "Q4_K"}
    edited = write_json_atomic(tmp_path / "edited.json", plan)
    code, io = run_export(edited, model, tmp_path / "x.gguf", capsys)
    assert code == 2 and "are not whole blocks of 256" in io.err and io.err.count("\n") == 1
    code, io = run_export(path, model, tmp_path / "x.gguf", capsys, "--target", "Q4_K_M")
    assert code == 2 and "--plan already fixes every tensor's type" in io.err
    assert not list(tmp_path.glob("*.gguf"))
    with pytest.raises(EWQError, match="applies to --backend llama.cpp only"):
        make_plan(str(model), target="Q4_K_M", backend="torchao", out_dir=tmp_path, progress=False)


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
    capsys.readouterr()  # what building the tiny models logged (transformers' config warnings) is not the export's
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



def test_a_checkpoint_on_a_q4_1_grid_is_recognised(smollm2_dir, tiny_factory, tmp_path):
    """The embedded SmolLM2 went through GGUF Q4_1: its weights sit on that grid, so Q4_1/Q5_1 (which re-find it) stay
    out of its sweep's default menu; random weights sit on none, and the same weights snapped to the grid do."""
    from safetensors.torch import load_file, save_file

    from ewq.analysis import on_q4_1_grid, q4_1_steps

    assert on_q4_1_grid(open_checkpoint(smollm2_dir))
    model = tiny_factory("llama", **KQ)
    assert not on_q4_1_grid(open_checkpoint(model))
    snapped = tmp_path / "snapped"
    snapped.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            (snapped / f.name).write_bytes(f.read_bytes())
    weights = load_file(model / "model.safetensors")
    for name, w in weights.items():
        if w.dim() == 2 and w.shape[-1] % 32 == 0:
            blocks, low, step = q4_1_steps(w)
            weights[name] = (low + ((blocks - low) / step).round() * step).reshape(w.shape).to(w.dtype)
    save_file(weights, snapped / "model.safetensors")
    assert on_q4_1_grid(open_checkpoint(snapped))
