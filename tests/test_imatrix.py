"""ewq.imatrix: llama.cpp importance matrices read as llama-quantize reads them, written so it can read them, another
model's refused; and python -m ewq.export gguf --imatrix FILE rounding every matrix with it. No llama.cpp needed
(bench/check_ggml_quants.py --imatrix and --gguf-pair check the rounding against ggml itself)."""

import struct

import numpy as np
import pytest
import torch

from ewq import export
from ewq.common import EWQError, run_cli
from ewq.ggml_quants import quantize_to_bytes
from ewq.gguf_export import tensor_names, tensor_shapes
from ewq.imatrix import ImportanceCollector, Imatrix, check_imatrix, load_imatrix, save_imatrix
from ewq.planning import make_plan

gguf = pytest.importorskip("gguf")

KQ = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def legacy_bytes(entries, chunks=7, dataset=b"calib.txt"):
    """A legacy .dat exactly as llama-imatrix's save_imatrix_legacy lays it out: (name, ncall, values)."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += np.asarray(values, dtype="<f4").tobytes()
    return out + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset


def test_legacy_file_is_normalised_as_llama_quantize_does(tmp_path):
    f = tmp_path / "m.dat"
    f.write_bytes(legacy_bytes([("blk.0.attn_q.weight", 3, [3.0, 6.0, 0.75]), ("blk.0.ffn_up.weight", 0, [2.0])]))
    im = load_imatrix(f)
    assert im.legacy and im.chunk_count == 7 and im.datasets == ["calib.txt"]
    np.testing.assert_array_equal(im.importance["blk.0.attn_q.weight"], np.float32([1.0, 2.0, 0.25]))  # / ncall
    np.testing.assert_array_equal(im.importance["blk.0.ffn_up.weight"], np.float32([2.0]))  # ncall 0: as stored
    assert im.gguf_metadata() == {"quantize.imatrix.file": str(f), "quantize.imatrix.dataset": "calib.txt",
                                  "quantize.imatrix.entries_count": 2, "quantize.imatrix.chunks_count": 7}


def test_gguf_and_legacy_written_read_back_the_same_importance(tmp_path):
    im = Imatrix(sums={"blk.0.attn_q.weight": np.float32([512.0, 1024.0, 0.0, 64.0])},
                 counts={"blk.0.attn_q.weight": 512}, datasets=["corpus"], chunk_count=2, chunk_size=256)
    for name in ("m.imatrix.gguf", "m.dat"):
        back = load_imatrix(save_imatrix(im, tmp_path / name))
        np.testing.assert_array_equal(back.importance["blk.0.attn_q.weight"], np.float32([1.0, 2.0, 0.0, 0.125]))
        assert back.datasets == ["corpus"] and back.chunk_count == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.dat", "m.imatrix.gguf"]  # no temporary file left
    r = gguf.GGUFReader(str(tmp_path / "m.imatrix.gguf"))  # llama-imatrix's layout: sums [cols] and counts [1]
    assert {t.name: list(t.shape) for t in r.tensors} == {"blk.0.attn_q.weight.in_sum2": [4, 1],
                                                          "blk.0.attn_q.weight.counts": [1, 1]}


@pytest.mark.parametrize("content,message", [
    (b"GGUF\x03\x00\x00\x00garbage", "not a readable GGUF imatrix"),
    (b"\x00\x00\x00\x00", "neither a GGUF nor a legacy .dat imatrix"),
    (legacy_bytes([("blk.0.attn_q.weight", 1, [1.0, 2.0])])[:20], "truncated"),
])
def test_unreadable_files_are_one_line(tmp_path, content, message):
    f = tmp_path / "bad.dat"
    f.write_bytes(content)
    with pytest.raises(EWQError, match=message):
        load_imatrix(f)


def test_collector_is_the_mean_of_squared_inputs():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    c = ImportanceCollector()
    x = torch.randn(2, 5, 4)
    with c.watching(lin, "blk"):
        lin(x)
        lin(x[:1])
    lin(x)  # outside the context: not counted
    im = c.imatrix({"blk.0.weight": "blk.0.attn_q.weight", "blk.2.weight": "blk.0.attn_k.weight"})
    want = torch.cat([x, x[:1]]).reshape(-1, 4).double().square().mean(0).float().numpy()
    np.testing.assert_allclose(im.importance["blk.0.attn_q.weight"], want, rtol=1e-6)
    assert im.counts == {"blk.0.attn_q.weight": 15, "blk.0.attn_k.weight": 15}


def test_another_models_imatrix_is_refused(tiny_factory):
    shapes = tensor_shapes(tiny_factory("llama", **KQ))
    good = Imatrix(sums={n: np.ones(s[1], np.float32) for n, s in shapes.items() if n.startswith("blk.")},
                   counts={n: 1 for n in shapes if n.startswith("blk.")})
    check_imatrix(good, shapes)
    wrong_cols = Imatrix(sums={**good.sums, "blk.0.ffn_down.weight": np.ones(256, np.float32)}, counts=good.counts)
    with pytest.raises(EWQError, match="blk.0.ffn_down.weight has 256 columns there, 512 in the model"):
        check_imatrix(wrong_cols, shapes)
    extra = Imatrix(sums={**good.sums, "blk.7.attn_q.weight": np.ones(256, np.float32)}, counts=good.counts)
    with pytest.raises(EWQError, match="another model: it has 1 entry the model does not"):
        check_imatrix(extra, shapes)
    partial = Imatrix(sums={n: v for n, v in good.sums.items() if not n.startswith("blk.1.")}, counts=good.counts)
    with pytest.raises(EWQError, match="lacks 7 of the model's block matrices"):
        check_imatrix(partial, shapes)


def test_export_rounds_with_the_imatrix_and_refuses_another_models(tiny_factory, tmp_path, capsys):
    model = tiny_factory("llama", **KQ)
    plan = make_plan(str(model), method="position", granularity="matrix", backend="llama.cpp", target_bpw=5.0,
                     out_dir=tmp_path, progress=False)[0]
    names = tensor_names(model)
    g = torch.Generator().manual_seed(0)
    im = Imatrix(datasets=["calib.txt"], chunk_count=3, chunk_size=64)
    for hf, gname in names.items():
        if gname.startswith("blk.") and gname.endswith("weight") and "norm" not in gname:
            cols = tensor_shapes(model)[gname][1]
            im.sums[gname] = (torch.rand(cols, generator=g) ** 4 * 100).numpy()
            im.counts[gname] = 192
    imfile = save_imatrix(im, tmp_path / "tiny.imatrix.gguf")
    out = tmp_path / "m.gguf"
    argv = ["gguf", "--plan", str(plan), "--model", str(model), "--out", str(out), "--no-progress"]
    assert run_cli(export.main, argv + ["--imatrix", str(imfile)]) == 0, capsys.readouterr().err
    r = gguf.GGUFReader(str(out))
    assert bytes(r.fields["quantize.imatrix.file"].parts[-1]).decode() == str(imfile)
    assert r.fields["quantize.imatrix.entries_count"].parts[-1][0] == len(im.sums)
    imp = im.importance
    from safetensors import safe_open

    checked = 0
    with safe_open(model / "model.safetensors", framework="pt") as f:
        for t in r.tensors:
            hf = next(h for h, gname in names.items() if gname == t.name)
            if t.name in imp and t.tensor_type.name not in ("F32", "F16", "BF16", "Q8_0") and "attn_" not in t.name:
                want = quantize_to_bytes(f.get_tensor(hf).float(), t.tensor_type.name, importance=imp[t.name])
                np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8).reshape(want.shape), want)
                checked += 1
    assert checked >= 4
    plain = tmp_path / "plain.gguf"
    assert run_cli(export.main, argv[:5] + ["--out", str(plain), "--no-progress", "--no-imatrix"]) == 0
    assert "quantize.imatrix.file" not in gguf.GGUFReader(str(plain)).fields and plain.read_bytes() != out.read_bytes()

    other = Imatrix(sums={"blk.0.attn_q.weight": np.ones(64, np.float32)}, counts={"blk.0.attn_q.weight": 1})
    wrong = save_imatrix(other, tmp_path / "other.imatrix.gguf")
    capsys.readouterr()
    bad_out = tmp_path / "bad.gguf"
    code = run_cli(export.main, argv[:5] + ["--out", str(bad_out), "--no-progress", "--imatrix", str(wrong)])
    err = capsys.readouterr().err
    assert code == 2 and "importance matrix of another model" in err and err.count("\n") == 1, err
    assert not bad_out.exists() and not list(tmp_path.glob(".bad.gguf*"))


def test_the_sweep_rounds_each_matrix_with_its_importance(tiny_factory, tmp_path):
    """A llama.cpp calibration makes EWQ's importance matrix once (llama-imatrix's statistic, a GGUF imatrix beside
    the cache, reused), and every matrix it quantizes is the file's rounding with that matrix's importance."""
    from ewq.backends import QuantSettings
    from ewq.checkpoint import open_checkpoint
    from ewq.ggml_quants import quantize_dequantize
    from ewq.sensitivity import Calibration
    from ewq.source import resolve_model

    model = tiny_factory("llama", **KQ)

    def calibration():
        return Calibration(resolve_model(str(model)), open_checkpoint(model), "f" * 32, 64, None, 32,
                           QuantSettings(backend="llama.cpp"), "matrix", "cpu")

    c = calibration()
    assert c.uses_importance() and c.key["imatrix"].startswith("calibration")
    cache = tmp_path / "s.imatrix.gguf"
    assert c.prepare_importance(cache, progress=False) == cache and cache.is_file()
    im = load_imatrix(cache)
    assert len(im.sums) == 14 and set(im.counts.values()) == {c.windows.numel()} and im.chunk_size == 32
    layer = c.sm.block(1).mlp.down_proj
    q = c._quantize((1, "mlp.down_proj", layer, "Q4_K"))
    imp = torch.from_numpy(im.importance["blk.1.ffn_down.weight"])
    assert torch.equal(q.weight.data, quantize_dequantize(layer.weight.data, "Q4_K", importance=imp))
    assert not torch.equal(q.weight.data, quantize_dequantize(layer.weight.data, "Q4_K"))
    again = calibration()
    again.prepare_importance(cache, progress=False)  # reused, not collected again
    assert again.sm is None and again.importance.keys() == c.importance.keys()
    assert Calibration(resolve_model(str(model)), open_checkpoint(model), "f" * 32, 64, None, 32,
                       QuantSettings(backend="llama.cpp", imatrix="none"), "matrix", "cpu").key != c.key
