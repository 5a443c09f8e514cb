"""An encoder plan as an ONNX model that ONNX Runtime and sentence-transformers load (python -m ewq.export onnx).

The float model is exported once with torch.onnx.export (TorchScript exporter, opset 17, dynamic batch and length;
output `last_hidden_state`), then ONNX Runtime's own quantizer, onnxruntime.quantization.quantize_dynamic, turns the
plan's 8-bit matrices, and only those, into int8: per_channel=True (one symmetric weight scale per output channel,
QInt8) and dynamic uint8 activations with one scale and zero point per tensor (DynamicQuantizeLinear, which ONNX
Runtime fuses with MatMulInteger into DynamicQuantizeMatMul). Raw matrices and everything else (embeddings,
attention products, norms) stay float32. Using ONNX Runtime's tooling means the file holds exactly the weights,
kernels and rounding ONNX Runtime gives its own int8 model, so a plan measured with `--backend onnxruntime` (which
quantizes each matrix the same way, ewq/backends/onnxruntime.py) is what the file computes.

Plan matrices are matched to the graph's MatMul nodes by the content of their weight (the exported initializer is
the Linear's weight transposed, bit for bit), so BERT, RoBERTa and XLM-R layouts map the same way whatever the
exporter names things.

The directory is sentence-transformers' layout: `onnx/<file>.onnx` beside config.json, the tokenizer files and the
pooling files (modules.json, 1_Pooling/, sentence_bert_config.json, 2_Normalize/ when the base model has them):
    SentenceTransformer(DIR, backend="onnx", model_kwargs={"file_name": "onnx/model_ewq_qint8.onnx"})
plus plan.json and metadata.json (method "ewq-onnxruntime") so `python -m ewq.serve --model DIR` serves it.
"""

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path

from .common import EWQError, write_json_atomic

METHOD = "ewq-onnxruntime"
ONNX_SUBDIR = "onnx"
QUANTIZED_FILE = "model_ewq_qint8.onnx"  # sentence-transformers' own exports are onnx/model_qint8_<arch>.onnx
FLOAT_FILE = "model.onnx"                # a plan without 8-bit matrices: sentence-transformers' default name
OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
FORMAT_8BIT = ("ONNX Runtime dynamic int8: int8 weights with one symmetric scale per output channel, activations "
               "quantized per call to uint8 with one scale and zero point per tensor (DynamicQuantizeLinear)")
MENU = ("raw", "8-bit")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model")


def require() -> None:
    """onnx and onnxruntime, or one line saying how to get them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise EWQError(f"ONNX export and the onnxruntime executor need onnx and onnxruntime ({e}); install them with "
                       f"`pip install -r requirements.txt`") from None


def onnx_file(directory) -> Path | None:
    """The ONNX model of a directory this module wrote (its metadata.json names it), else None."""
    try:
        meta = json.loads((Path(directory) / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("method") != METHOD or not isinstance(meta.get("onnx_file"), str):
        return None
    path = Path(directory) / meta["onnx_file"]
    if not path.is_file():
        raise EWQError(f"{directory}/metadata.json names {meta['onnx_file']}, which is missing; export it again")
    return path


def plan_precisions(plan: dict) -> dict:
    """{(block index, matrix name): "raw" | "8-bit"} of every planned matrix; other precisions refused in one line."""
    from .plan import layer_precision, other_matrices

    if not plan["blocks"] or not plan["blocks"][0].get("shapes"):
        raise EWQError("the plan does not list its matrices (an older plan); regenerate it with main_cache_model.py")
    out = {(b["index"], m): layer_precision(b, m) for b in plan["blocks"] for m in b["shapes"]}
    other = {p for p in other_matrices(plan).values() if p != "raw"}
    bad = sorted({p for p in out.values() if p not in MENU} | other)
    if bad:
        raise EWQError(f"ONNX Runtime's dynamic quantization has 8-bit only; the plan uses {', '.join(bad)}: make it "
                       f"with main_cache_model.py --backend onnxruntime (raw and 8-bit)")
    return out


def input_names(tokenizer) -> list:
    """The inputs the graph takes: what the tokenizer gives, in INPUT_NAMES' order (RoBERTa's tokenizers give no
    token_type_ids)."""
    given = getattr(tokenizer, "model_input_names", ())
    return list(INPUT_NAMES[:2]) + (["token_type_ids"] if "token_type_ids" in given else [])


def export_float(model, tokenizer, path: Path) -> None:
    """The float encoder as ONNX (dynamic batch and sequence axes; output last_hidden_state)."""
    import torch

    names = input_names(tokenizer)

    class Hidden(torch.nn.Module):  # transformers 5's forward takes its inputs as keywords only
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, *inputs):
            return self.encoder(**dict(zip(names, inputs))).last_hidden_state

    example = tokenizer(["an example sentence", "and a longer one, for the exporter"], padding=True,
                        return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in names + [OUTPUT_NAME]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(Hidden(model).eval(), tuple(example[n] for n in names), str(path), input_names=names,
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def weight_digest(array) -> str:
    import numpy as np

    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def find_module(model, plan_prefix: str, index: int, matrix: str):
    """The model's Linear for a plan matrix; the plan's prefix may carry a head's name (roberta.encoder.layer) that a
    bare AutoModel lacks (encoder.layer)."""
    modules = dict(model.named_modules())
    parts = plan_prefix.split(".")
    for start in range(len(parts)):
        name = ".".join(parts[start:] + [str(index), matrix])
        if name in modules:
            return modules[name]
    raise EWQError(f"the model has no layer {plan_prefix}.{index}.{matrix}; is the plan for this model?")


def matrix_nodes(graph, model, plan: dict, precisions: dict) -> dict:
    """{(block, matrix): MatMul node name} by weight content (see the module doc)."""
    from onnx import numpy_helper

    from .backends import float_weight

    initializers = {i.name: i for i in graph.initializer}
    by_digest = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            digest = weight_digest(numpy_helper.to_array(initializers[node.input[1]]))
            by_digest.setdefault(digest, []).append(node.name)
    out = {}
    for (index, matrix) in precisions:
        weight = float_weight(find_module(model, plan["model"]["block_prefix"], index, matrix))[0]
        nodes = by_digest.get(weight_digest(weight.detach().float().T.numpy()), [])
        if len(nodes) != 1:
            raise EWQError(f"block {index} {matrix}: {'no' if not nodes else 'more than one'} MatMul in the exported "
                           f"graph holds its weight; this layout cannot be exported to ONNX by EWQ")
        out[(index, matrix)] = nodes[0]
    return out


def split_outliers(graph, node_name: str, channels) -> None:
    """Take input `channels` of MatMul `node_name` (constant weight [in, out]) out of its int8 product, in place:
        x @ W = (x * mask) @ W_rest + Gather(x, channels, axis=-1) @ W[channels]
    exactly in float; the first product is what ONNX Runtime's quantizer makes int8 (the outliers no longer set its
    per-tensor activation scale, nor the weight scales of W_rest, whose rows are zeroed), the second stays float32
    (a small MatMul, never quantized: it is not in nodes_to_quantize). Standard ONNX ops only, so every runtime that
    loads the file runs it. The outputs' names do not change: consumers are untouched."""
    import numpy as np
    from onnx import helper, numpy_helper

    index = next(i for i, n in enumerate(graph.node) if n.name == node_name)
    node = graph.node[index]
    inits = {i.name: i for i in graph.initializer}
    weight = numpy_helper.to_array(inits[node.input[1]])
    idx = np.asarray(sorted(int(c) for c in channels), dtype=np.int64)
    rest = weight.copy()
    rest[idx, :] = 0.0
    mask = np.ones(weight.shape[0], dtype=np.float32)
    mask[idx] = 0.0
    tag = f"{node_name}/ewq_outliers"
    graph.initializer.extend([numpy_helper.from_array(rest, f"{tag}/weight_rest"),
                              numpy_helper.from_array(mask, f"{tag}/mask"),
                              numpy_helper.from_array(idx, f"{tag}/channels"),
                              numpy_helper.from_array(np.ascontiguousarray(weight[idx, :]), f"{tag}/weight")])
    x, out, old = node.input[0], node.output[0], node.input[1]
    before = [helper.make_node("Mul", [x, f"{tag}/mask"], [f"{tag}/x_rest"], name=f"{tag}/mask_mul"),
              helper.make_node("Gather", [x, f"{tag}/channels"], [f"{tag}/x"], name=f"{tag}/gather", axis=-1)]
    after = [helper.make_node("MatMul", [f"{tag}/x", f"{tag}/weight"], [f"{tag}/product"], name=f"{tag}/matmul"),
             helper.make_node("Add", [f"{tag}/int8_product", f"{tag}/product"], [out], name=f"{tag}/add")]
    node.input[0], node.input[1], node.output[0] = f"{tag}/x_rest", f"{tag}/weight_rest", f"{tag}/int8_product"
    for offset, n in enumerate(after):
        graph.node.insert(index + 1 + offset, n)
    for n in reversed(before):
        graph.node.insert(index, n)
    if not any(old in n.input for n in graph.node):  # the whole weight is no longer read: not kept in the file
        graph.initializer.remove(inits[old])


def quantize(float_path: Path, out_path: Path, nodes: list) -> None:
    """ONNX Runtime's own dynamic quantizer on exactly `nodes` (MatMul names): per-channel QInt8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing": a note for static quantization
    try:
        quantize_dynamic(float_path, out_path, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=list(nodes),
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.getLogger().setLevel(level)


def write_layout(directory: Path, source, ckpt, tokenizer) -> None:
    """config.json, the tokenizer and the pooling files beside onnx/: what sentence-transformers and optimum read."""
    from .artifact import SENTENCE_TRANSFORMERS_FILES

    (directory / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
    # the base model's own tokenizer files, as they are: the deploying venv may run an older transformers that
    # reads them but not what this one's save_pretrained writes
    if not any((source.path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer.save_pretrained(directory)
    for name in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES + ("config_sentence_transformers.json",):
        if (source.path / name).is_dir():
            shutil.copytree(source.path / name, directory / name)
        elif (source.path / name).is_file():
            shutil.copy2(source.path / name, directory / name)


def choose_outliers(model, plan: dict, path, max_channels: int) -> dict:
    """{(block, matrix): [input channels]} kept out of each 8-bit matrix's int8 product, chosen on calibration
    sentences as --backend onnxruntime --outlier-channels measures them (ewq/outliers.py: each count tried with
    ONNX Runtime's own kernel, kept only where it halves the matrix's error); matrices that keep none are left out."""
    from .apply import prepare_for_plan
    from .backends import QuantSettings

    if not max_channels:
        return {}
    chosen = prepare_for_plan(model, plan, QuantSettings("onnxruntime", outlier_channels=int(max_channels)), path)
    out = {}
    for key, entry in (chosen or {}).items():
        index, matrix = key.split(".", 1)
        if entry["outliers"]:
            out[(int(index), matrix)] = entry["outliers"]
    return out


def apply_outliers(float_path: Path, nodes: dict, outliers: dict) -> None:
    """The float file with each matrix's outlier channels split out of its product (split_outliers), rewritten."""
    import onnx

    if not outliers:
        return
    model = onnx.load(str(float_path))
    for key, channels in outliers.items():
        split_outliers(model.graph, nodes[key], channels)
    onnx.save(model, str(float_path))


def export_onnx(plan: dict, source, ckpt, out, fingerprint: str, outlier_channels: int = 0) -> dict:
    """Write the plan's ONNX directory for a checkpoint the plan was already matched to. `out` must not exist yet:
    everything is written under a temporary name beside it, then renamed. `outlier_channels`: up to this many input
    channels per 8-bit matrix kept in float32 beside its int8 product (0: none)."""
    import onnx
    import onnxruntime
    import torch

    from .apply import load_model
    from .plan import plan_hash
    from .source import load_tokenizer

    require()
    if ckpt.kind != "encoder":
        raise EWQError(f"{source.id} is a decoder; the ONNX export is for encoders (BERT, RoBERTa, XLM-R layouts); "
                       f"use python -m ewq.export gguf for llama.cpp")
    precisions = plan_precisions(plan)
    out = Path(out)
    if out.exists():
        raise EWQError(f"--out {out} already exists; give a new directory (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ONNX_SUBDIR).mkdir(parents=True)
    try:
        tokenizer = load_tokenizer(source.path)
        model = load_model(source.path, torch.float32, "encoder")
        outliers = choose_outliers(model, plan, source.path, outlier_channels)
        float_path = tmp / ONNX_SUBDIR / FLOAT_FILE
        export_float(model, tokenizer, float_path)
        nodes = matrix_nodes(onnx.load(str(float_path), load_external_data=False).graph, model, plan, precisions)
        eight = [nodes[k] for k, p in precisions.items() if p == "8-bit"]
        apply_outliers(float_path, nodes, outliers)
        name = QUANTIZED_FILE if eight else FLOAT_FILE
        if eight:
            quantize(float_path, tmp / ONNX_SUBDIR / name, eight)
            float_path.unlink()
        write_layout(tmp, source, ckpt, tokenizer)
        write_json_atomic(tmp / "plan.json", plan)
        counts = {p: sum(1 for v in precisions.values() if v == p) for p in MENU}
        write_json_atomic(tmp / "metadata.json", {
            "schema_version": 1, "is_quantized": bool(eight), "method": METHOD, "kind": "encoder", "format": "onnx",
            "onnx_file": f"{ONNX_SUBDIR}/{name}", "onnx_bytes": (tmp / ONNX_SUBDIR / name).stat().st_size,
            "base_model": source.id, "base_path": str(source.path), "base_fingerprint": fingerprint,
            "fingerprint": fingerprint, "plan_hash": plan_hash(plan), "counts": plan["counts"],
            "matrix_counts": counts, "formats": {"8-bit": FORMAT_8BIT, "raw": "float32"},
            "avg_bits_per_weight": plan["size"]["avg_bits_per_weight"],  # the plan's estimate, raw at its raw_bits
            "quantized_nodes": sorted(eight), "opset": OPSET,
            "matrix_nodes": {f"{index}.{matrix}": node for (index, matrix), node in nodes.items()},
            "outlier_channels": int(outlier_channels),
            "outliers": {f"{index}.{matrix}": channels for (index, matrix), channels in outliers.items()},
            "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        })
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "onnx_file": str(out / ONNX_SUBDIR / name), "bytes": (out / ONNX_SUBDIR / name).stat().st_size,
            "counts": counts}


def base_of(source, models_dir):
    """The float checkpoint to export from: the model itself, or the base a saved quantized model was made from
    (its int8 weights are not what ONNX Runtime's quantizer starts from)."""
    from .artifact import read_metadata
    from .source import resolve_model

    meta = read_metadata(source.path)
    if not (meta and meta.get("is_quantized")):
        return source
    base = meta.get("base_path") or meta.get("base_model")
    if not base or not Path(base).is_dir() and not meta.get("base_model"):
        raise EWQError(f"{source.path} is a saved quantized model whose base model is not recorded; pass the base "
                       f"model as --model")
    try:
        return resolve_model(base if Path(base).is_dir() else meta["base_model"], models_dir)
    except EWQError as e:
        raise EWQError(f"{source.path} is a saved quantized model; its base model {base} is needed to export "
                       f"({e})") from None


def export_plan_onnx(plan_path, model: str, out, models_dir, outlier_channels: int = 0) -> dict:
    """python -m ewq.export onnx: the plan file's ONNX directory; a plan made for other weights is refused before
    anything is written."""
    from .analysis import fingerprint as weights_fingerprint
    from .checkpoint import open_checkpoint
    from .plan import check_plan_matches, load_plan
    from .source import resolve_model

    require()
    from .outliers import check_count

    check_count(outlier_channels)
    plan = load_plan(plan_path)
    if Path(out).exists():
        raise EWQError(f"--out {out} already exists; give a new directory (nothing is overwritten)")
    source = base_of(resolve_model(model, models_dir), models_dir)
    ckpt = open_checkpoint(source.path)
    fp = weights_fingerprint(ckpt, progress=False)
    check_plan_matches(plan, fp, len(ckpt.blocks), plan_path, ckpt.kind)
    return {**export_onnx(plan, source, ckpt, out, fp, outlier_channels), "base": str(source.path)}


def add_parser(formats) -> None:
    """The `onnx` subcommand of python -m ewq.export."""
    from .source import DEFAULT_MODELS_DIR, ENCODER_MODEL

    o = formats.add_parser("onnx", help="an ONNX model for ONNX Runtime and sentence-transformers (encoders)",
                           description="Write an encoder plan as an ONNX model directory: int8 (ONNX Runtime's dynamic "
                                       "quantization, per-channel weights) where the plan says 8-bit, float32 where it "
                                       "says raw, in sentence-transformers' layout.")
    o.add_argument("--plan", required=True, help="plan JSON from main_cache_model.py for this encoder (raw and 8-bit "
                                                 "only; --backend onnxruntime measures 8-bit as this file runs it)")
    o.add_argument("--model", required=True,
                   help=f"the encoder the plan was made for (directory, Hugging Face id, '{ENCODER_MODEL}', or a saved "
                        f"quantized model, whose base model is then exported); its fingerprint must match the plan's")
    o.add_argument("--out", required=True, help="the directory to write (must not exist; written under a temporary "
                                                "name, then renamed): onnx/<file>.onnx, tokenizer, pooling, metadata")
    o.add_argument("--outlier-channels", type=int, default=0,
                   help="up to this many input channels per 8-bit matrix (0-8) kept in float32 beside its int8 "
                        "product, chosen on calibration sentences with ONNX Runtime's kernel where they at least halve "
                        "the matrix's error: BERT's few huge activation channels then no longer set the per-tensor "
                        "activation scale (default 0: none)")
    o.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where fetched/converted models live")


def main(args) -> None:
    result = export_plan_onnx(args.plan, args.model, args.out, args.models_dir, args.outlier_channels)
    counts = result["counts"]
    print(f"wrote {result['onnx_file']}: {result['bytes'] / 1e6:.1f} MB, {counts['8-bit']} matrices int8, "
          f"{counts['raw']} float32 (from {result['base']})")
    print(f'load it: SentenceTransformer("{result["path"]}", backend="onnx", model_kwargs={{"file_name": '
          f'"{Path(result["onnx_file"]).relative_to(result["path"])}"}})')
    print(result["path"])
