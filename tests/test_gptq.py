"""ewq.gptq: rounding with error feedback onto ggml's formats (`python -m ewq.export gguf --rounding gptq`)."""

import numpy as np
import pytest
import torch

from ewq import gptq
from ewq import ggml_quants as gq
from ewq.common import run_cli

gguf = pytest.importorskip("gguf")


def dequantized(packed, type_name, shape):
    values = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape))


def correlated_inputs(n, cols, seed):
    """Inputs whose columns move together (as a layer's do): GPTQ has something to cancel errors with."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=torch.Generator().manual_seed(7)) / cols ** 0.5 + torch.eye(cols)
    return torch.randn(n, cols, generator=g) @ mix


def test_without_feedback_it_is_ggmls_rounding_and_its_bytes_hold_its_values():
    """Uncorrelated inputs (H = I): no error moves, every weight to the nearest value of the scales ggml's search
    picks: llama-quantize's own bytes where ggml's last pass is that nearest value (k-quants, IQ4_NL); for every
    type, gguf-py reads back from the bytes exactly the values gptq_round says it wrote."""
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    identity = gptq.inverse_factor(torch.eye(512))
    for type_name in gq.GRID_LEVELS:
        packed, values = gptq.gptq_round(w, type_name, identity)
        assert packed.shape == gq.quantize_to_bytes(w, type_name).shape
        assert torch.equal(dequantized(packed, type_name, w.shape), values), type_name
        if type_name in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL"):
            assert np.array_equal(packed, gq.quantize_to_bytes(w, type_name)), type_name


@pytest.mark.parametrize("type_name", ["Q4_0", "Q3_K", "IQ4_NL"])
def test_with_correlated_inputs_the_output_error_drops_on_inputs_it_never_saw(type_name):
    """H from 4096 calibration inputs: on 4096 other inputs of the same kind the output error (W - Q) x is well below
    llama-quantize --imatrix's with the same importance (what the export's default rounding writes)."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    calib, unseen = correlated_inputs(4096, 256, 2), correlated_inputs(4096, 256, 3)
    h = calib.T @ calib / calib.shape[0]
    importance = h.diagonal().clone()
    packed, values = gptq.gptq_round(w, type_name, gptq.inverse_factor(h), importance)
    nearest = gq.quantize_dequantize(w, type_name, importance=importance)
    err = lambda q: ((w - q) @ unseen.T).square().sum().item()  # noqa: E731
    assert err(values) < 0.8 * err(nearest), (err(values), err(nearest))
    assert torch.equal(dequantized(packed, type_name, w.shape), values)


def test_layers_fed_one_tensor_share_one_hessian():
    """q/k/v (and gate/up) see the same input: one X^T X, computed once; a layer with its own input has its own."""
    block = torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "k": torch.nn.Linear(8, 4), "o": torch.nn.Linear(8, 8)})
    collector = gptq.HessianCollector()
    handles = collector.watch(block, {"q": "q", "k": "k", "o": "o"})
    for seed in range(2):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
        block["q"](x), block["k"](x), block["o"](x * 2)
    for h in handles:
        h.remove()
    assert collector.source("k") == "q" and set(collector.sums) == {"q", "o"}
    assert torch.allclose(collector.hessian("o"), 4 * collector.hessian("k"))


def test_export_rounds_with_feedback_at_the_same_types_and_size(tiny_factory, tmp_path, capsys):
    """--rounding gptq: the plan's types and the file's size exactly as the default rounding's, the block matrices'
    levels changed (the embeddings are not a product's input: as llama-quantize writes them; the output head as
    llama-quantize writes it too); flags that cannot mean anything with it are refused before any work, one line, exit 2."""
    from ewq import export
    from ewq.planning import make_plan

    model = tiny_factory("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    plan = make_plan(str(model), method="position", granularity="matrix", backend="llama.cpp", target="Q4_K_M",
                     out_dir=tmp_path, progress=False)[0]
    files = {}
    for rounding in ("llama-quantize", "gptq"):
        files[rounding] = tmp_path / f"{rounding}.gguf"
        argv = ["gguf", "--plan", str(plan), "--model", str(model), "--out", str(files[rounding]), "--no-progress",
                "--rounding", rounding] + (["--gptq-tokens", "512"] if rounding == "gptq" else [])
        assert run_cli(export.main, argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    plain, fed = (gguf.GGUFReader(files[r]) for r in ("llama-quantize", "gptq"))
    assert files["gptq"].stat().st_size == files["llama-quantize"].stat().st_size
    a, b = ({t.name: t for t in r.tensors} for r in (plain, fed))
    assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}
    changed = {n for n in a if not np.array_equal(a[n].data, b[n].data)}
    blocks = {n for n, t in a.items() if n.startswith("blk.") and t.tensor_type.name in gq.GRID_LEVELS}
    assert changed == blocks and blocks
    # ... each still the checkpoint's matrix in llama.cpp's layout (q/k rows permuted as the exporter writes them):
    # GPTQ trades some error in the weights for less in the outputs, never a different matrix
    from safetensors.torch import load_file

    from ewq.gguf_export import llama_layout, tensor_names

    layout, weights = llama_layout(model), load_file(model / "model.safetensors")
    for hf, name in tensor_names(model).items():
        if name in blocks:
            w = layout(hf, weights[hf].float())
            plain_w, fed_w = (torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
                              .reshape(w.shape) for t in (a[name], b[name]))
            assert (fed_w - w).norm() < 3 * (plain_w - w).norm() < 0.5 * w.norm(), name
    for argv, message in ((["--gptq-tokens", "1024"], "--gptq-tokens is the calibration of --rounding gptq"),
                          (["--rounding", "gptq", "--llama-quantize-args"], "drop it or --rounding gptq"),
                          (["--rounding", "gptq", "--gptq-tokens", "100"], "at least 256"),
                          (["--rounding", "gptq", "--gptq-tokens", "1000000"], "fewer tokens than that")):
        out = tmp_path / "refused.gguf"
        code = run_cli(export.main, ["gguf", "--plan", str(plan), "--model", str(model), "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1 and not out.exists(), err
        assert not list(tmp_path.glob(".refused.gguf*"))  # nor its temporary files
