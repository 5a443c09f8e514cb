"""ONNX export and the onnxruntime executor (issue 27): python -m ewq.export onnx writes the plan's matrices as ONNX
Runtime's int8 (8-bit) or float32 (raw) in sentence-transformers' layout; the onnxruntime backend measures each matrix
as that file computes it; benchmark.py and the service run the file through ONNX Runtime."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -r requirements.txt)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements.txt)")

from ewq.analysis import fingerprint  # noqa: E402
from ewq.checkpoint import open_checkpoint  # noqa: E402
from ewq.common import run_cli  # noqa: E402
from ewq.export import main as export_main  # noqa: E402
from ewq.plan import builtin_plan  # noqa: E402
from ewq.source import ModelSource  # noqa: E402

SENTENCES = ["The cat sat on the mat.", "A much longer sentence about the weather in the hills, said the farmer.",
             "Is it?", "Rain fell on the town for three days and the river rose."]
RAW = {0: ("attention.self.query", "output.dense"), 2: ("intermediate.dense",)}  # block: matrices kept float


def write_plan(model_dir: Path, path: Path, raw=RAW, precision="8-bit") -> dict:
    ckpt = open_checkpoint(model_dir)
    plan = builtin_plan("uniform-8bit", ModelSource(model_dir.name, model_dir), ckpt, fingerprint(ckpt, progress=False),
                        32)
    for b in plan["blocks"]:
        b["matrices"] = {m: ("raw" if m in raw.get(b["index"], ()) else precision) for m in b["shapes"]}
    path.write_text(json.dumps(plan))
    return plan


def export(model_dir, plan_path, out) -> int:
    return run_cli(export_main, ["onnx", "--plan", str(plan_path), "--model", str(model_dir), "--out", str(out)])


def ort_embed(directory: Path, sentences, alone: bool = True) -> torch.Tensor:
    """Embeddings of the exported directory through ONNX Runtime (the service's path): each sentence in its own
    forward pass, or all in one padded batch."""
    from ewq.serve.model import Service

    service = Service(str(directory))
    if not alone:
        return torch.tensor(np.stack([v for v, _, _ in service.embed_rows(sentences)]))
    return torch.tensor(np.stack([service.embed_rows([s])[0][0] for s in sentences]))


@pytest.fixture(scope="module")
def bert_export(tiny_encoder, tmp_path_factory):
    model = tiny_encoder("bert")
    tmp = tmp_path_factory.mktemp("onnx")
    write_plan(model, tmp / "plan.json")
    assert export(model, tmp / "plan.json", tmp / "out") == 0
    return model, tmp / "plan.json", tmp / "out"


def test_export_follows_the_plan_in_sentence_transformers_layout(bert_export):
    model, _, out = bert_export
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["method"] == "ewq-onnxruntime" and meta["matrix_counts"] == {"raw": 3, "8-bit": 15}
    for name in ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json", "plan.json"):
        assert (out / name).is_file(), name
    graph = onnx.load(str(out / meta["onnx_file"])).graph
    assert meta["onnx_file"].startswith("onnx/")
    integer = {n.name.removesuffix("_quant") for n in graph.node if n.op_type == "MatMulInteger"}
    assert integer == set(meta["quantized_nodes"])  # exactly the plan's 8-bit matrices, nothing else
    nodes = meta["matrix_nodes"]
    for key in ("0.attention.self.query", "0.output.dense", "2.intermediate.dense"):
        assert nodes[key] not in integer and any(n.name == nodes[key] and n.op_type == "MatMul" for n in graph.node)
    inits = {i.name: i for i in graph.initializer}
    query1 = next(n for n in graph.node if n.name == nodes["1.attention.self.query"] + "_quant")
    # int8 weights with one scale per output channel (64 rows)
    assert inits[query1.input[1]].data_type == onnx.TensorProto.INT8
    scale = inits[query1.input[1].removesuffix("_quantized") + "_scale"]
    assert list(scale.dims) == [64]


def test_backend_measures_what_the_file_computes(tiny_encoder, tmp_path):
    """The executor the sweep and benchmarks use (each matrix through ONNX Runtime's quantizer and kernel, outlier
    channels chosen on calibration sentences) gives the exported file's vectors: what is measured is what users run.
    The outlier channels are split out of the int8 products with standard ops (Mul, Gather, MatMul)."""
    import onnx as onnx_lib

    from ewq import outliers
    from ewq.apply import apply_plan, load_model, plan_layers
    from ewq.backends import QuantSettings
    from ewq.embed import Embedder, fidelity
    from ewq.onnx_export import onnx_file
    from ewq.source import load_tokenizer

    model = tiny_encoder("bert", outlier_gain=30.0)
    plan_path = tmp_path / "plan.json"
    write_plan(model, plan_path)
    out = tmp_path / "outliers"
    assert run_cli(export_main, ["onnx", "--plan", str(plan_path), "--model", str(model), "--out", str(out),
                                 "--outlier-channels", "1"]) == 0  # (1: two candidates a matrix, quick)
    meta = json.loads((out / "metadata.json").read_text())
    # the planted channel is taken out of the int8 product of each block's 8-bit FFN input matrix
    assert meta["outlier_channels"] == 1 and {"1.intermediate.dense": [0]}.items() <= meta["outliers"].items(), meta
    graph = onnx_lib.load(str(onnx_file(out))).graph
    assert sum(n.op_type == "Gather" and "ewq_outliers" in n.name for n in graph.node) == len(meta["outliers"])
    ckpt = open_checkpoint(model)
    embedder = Embedder.of(model, ckpt.config, load_tokenizer(model))
    plan = json.loads(plan_path.read_text())
    torch_ort = load_model(model, torch.float32, "encoder")  # with the channels the export chose (calibrating
    for index, _, name, layer, precision in plan_layers(torch_ort, plan):  # again would double this test's time)
        if precision != "raw":
            chosen = meta["outliers"].get(f"{index}.{name}")
            setattr(layer, outliers.ATTRIBUTE, None if chosen is None else torch.tensor(chosen))
    apply_plan(torch_ort, plan, QuantSettings("onnxruntime", outlier_channels=1), torch.float32, progress=False)
    from_file = ort_embed(out, SENTENCES)
    from_layers = torch.stack([embedder.batch(torch_ort, [s])[0] for s in SENTENCES])
    float_vectors = torch.stack([embedder.batch(load_model(model, torch.float32, "encoder"), [s])[0]
                                 for s in SENTENCES])
    same = fidelity(from_file, from_layers)["cosine_loss_mean"]
    quantized = fidelity(float_vectors, from_file)["cosine_loss_mean"]
    assert quantized > 0 and same < quantized / 20, (same, quantized)


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta"])
def test_roberta_layouts_export(tiny_encoder, tmp_path, kind):
    from ewq.apply import load_model
    from ewq.embed import Embedder, fidelity
    from ewq.source import load_tokenizer

    model = tiny_encoder(kind)
    write_plan(model, tmp_path / "plan.json", raw={1: ("attention.output.dense",)})
    assert export(model, tmp_path / "plan.json", tmp_path / "out") == 0
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["matrix_counts"] == {"raw": 1, "8-bit": 17}
    embedder = Embedder.of(model, open_checkpoint(model).config, load_tokenizer(model))
    reference = torch.stack([embedder.batch(load_model(model, torch.float32, "encoder"), [s])[0] for s in SENTENCES])
    assert fidelity(reference, ort_embed(tmp_path / "out", SENTENCES))["cosine_mean"] > 0.99


def test_refusals_write_nothing(bert_export, tiny_encoder, tmp_path, capsys):
    model, plan_path, out = bert_export
    write_plan(model, tmp_path / "plan4.json", precision="4-bit")
    assert export(model, tmp_path / "plan4.json", tmp_path / "new") == 2
    err = capsys.readouterr().err
    assert "8-bit only" in err and "--backend onnxruntime" in err and len(err.strip().splitlines()) == 1
    before = sorted(p.name for p in out.rglob("*"))
    assert export(model, plan_path, out) == 2 and "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    other = tiny_encoder("roberta")  # a plan made for other weights
    assert export(other, plan_path, tmp_path / "other") == 2 and "other weights" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "other").exists()
    assert not list(tmp_path.glob(".*partial*"))
    saved = tmp_path / "saved"  # a saved quantized model is exported from its base, which must be at hand
    saved.mkdir()
    for name in ("model.safetensors", "config.json"):
        (saved / name).write_bytes((model / name).read_bytes())
    (saved / "metadata.json").write_text(json.dumps({"is_quantized": True, "method": "dynamic-ptq-int8",
                                                     "base_path": str(tmp_path / "gone")}))
    assert export(saved, plan_path, tmp_path / "from-saved") == 2
    assert "base model" in capsys.readouterr().err and not (tmp_path / "from-saved").exists()


def test_service_serves_the_export_per_request(bert_export, tmp_path):
    """int8 activations are scaled over the whole batch, so requests must not share a forward pass; a float export
    may (its vectors do not depend on batch-mates)."""
    from ewq.serve.model import Service

    model, _, out = bert_export
    service = Service(str(out))
    assert service.info["method"] == "ewq-onnxruntime" and service.info["is_quantized"] is True
    assert service.batching["cross_request"] is False
    together = np.stack([v for v, _, _ in service.embed_rows(SENTENCES)])
    alone = np.stack([service.embed_rows([s])[0][0] for s in SENTENCES])
    assert np.abs(together - alone).max() > 1e-4  # why: ONNX Runtime's per-tensor activation scale
    write_plan(model, tmp_path / "raw.json", raw={b: ("attention.self.query", "attention.self.key",
               "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
               for b in range(3)})
    assert export(model, tmp_path / "raw.json", tmp_path / "float") == 0
    float_service = Service(str(tmp_path / "float"))
    assert float_service.batching["cross_request"] is True
    together = np.stack([v for v, _, _ in float_service.embed_rows(SENTENCES)])
    alone = np.stack([float_service.embed_rows([s])[0][0] for s in SENTENCES])
    assert np.abs(together - alone).max() < 1e-5


ST_PYTHON = os.environ.get("EWQ_ST_PYTHON")


@pytest.mark.skipif(not ST_PYTHON, reason="EWQ_ST_PYTHON does not name a Python with sentence-transformers[onnx] "
                                          "(make one with bench/st_onnx_venv.sh)")
def test_sentence_transformers_loads_the_export(bert_export):
    """As users deploy: sentence-transformers' ONNX backend (optimum) in its own environment loads the directory and
    embeds as ONNX Runtime does here."""
    _, _, out = bert_export
    meta = json.loads((out / "metadata.json").read_text())
    script = ("import json, sys; from sentence_transformers import SentenceTransformer; "
              f"m = SentenceTransformer({str(out)!r}, backend='onnx', model_kwargs={{'file_name': {meta['onnx_file']!r}}}); "
              f"print(json.dumps(m.encode({SENTENCES!r}).tolist()))")
    done = subprocess.run([ST_PYTHON, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    ours = ort_embed(out, SENTENCES, alone=False)  # one padded batch, as encode() runs four sentences
    cos = torch.nn.functional.cosine_similarity(theirs.double(), ours.double(), dim=-1)
    assert cos.min() > 0.999, cos


def test_benchmark_runs_the_plan_through_onnxruntime(bert_export, tmp_path, capsys):
    """benchmark.py --backend onnxruntime: the plan exported once and run by ONNX Runtime in the encoder suite;
    a second run reuses the export."""
    import benchmark

    model, plan_path, _ = bert_export
    argv = ["--model", str(model), "--plan", str(plan_path), "--backend", "onnxruntime", "--eval-sentences", "40",
            "--speed-sentences", "4", "--repeats", "1", "--no-progress", "--out-dir", str(tmp_path / "res"),
            "--plans-dir", str(tmp_path / "plans")]
    assert run_cli(benchmark.main, argv) == 0
    result = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert result["variant"].endswith("@onnxruntime") and result["load"]["path_taken"] == "onnxruntime-onnx"
    by_precision = result["memory"]["weight_bytes_by_precision"]
    assert by_precision["8-bit"] > 0 and by_precision["raw"] > 0
    assert result["quality"]["cosine_mean"] > 0.99 and result["encoder"]["batch_32"]["sentences_per_s"] > 0
    assert run_cli(benchmark.main, argv) == 0
    assert "reusing" in capsys.readouterr().out


def test_the_original_runs_through_onnxruntime_from_its_own_plans_dir(bert_export, tmp_path, capsys):
    """benchmark_original.py --backend onnxruntime exports the float model into --plans-dir (the flag was missing:
    the llama.cpp and onnxruntime originals read it)."""
    import benchmark_original

    model, _, _ = bert_export
    argv = ["--model", str(model), "--backend", "onnxruntime", "--eval-sentences", "40", "--speed-sentences", "4",
            "--repeats", "1",
            "--no-progress", "--out-dir", str(tmp_path / "res"), "--plans-dir", str(tmp_path / "plans")]
    assert run_cli(benchmark_original.main, argv) == 0, capsys.readouterr().err
    result = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert result["load"]["path_taken"] == "onnxruntime-onnx"
    assert [p.name for p in (tmp_path / "plans").iterdir() if "-onnx" in p.name]
