"""ONNX Runtime's dynamic int8 (CPU, encoders): what `python -m ewq.export onnx` writes, measured as ONNX Runtime runs it.

8-bit here is exactly what onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8) makes and
ONNX Runtime's CPU kernels compute: int8 weights with one symmetric scale per output channel; activations quantized
per call to uint8 with ONE scale and zero point per tensor, i.e. over the whole batch (DynamicQuantizeLinear, fused
into DynamicQuantizeMatMul / MatMulIntegerToFloat); an int32 product, scaled back to float32, plus the bias.

Two uses:
- the sensitivity sweep (main_cache_model.py --method sensitivity --backend onnxruntime) and any torch model built
  with this backend: each 8-bit matrix becomes an `OrtLinear`, a one-MatMul ONNX graph quantized by ONNX Runtime's
  own quantizer and run by an ONNX Runtime session, so every matrix is measured with ONNX Runtime's weights, kernels
  and rounding (including what its int8 kernel does on this CPU), not an imitation;
- benchmark.py / benchmark_original.py --backend onnxruntime (encoders): the whole plan exported once as an ONNX file
  (ewq/onnx_export.py) and run by one ONNX Runtime session (`OrtEncoder`), timed and scored by the encoder suite.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import outliers as outlier_channels
from ..common import EWQError
from . import float_weight

PRECISIONS = ("8-bit",)
COMPILES = False
COMPILE_NOTE = "ONNX Runtime runs its own graph; torch.compile has nothing to compile"
SAVE_METHOD = None  # a plan leaves as an ONNX file (python -m ewq.export onnx), not through --save


def require() -> None:
    from ..onnx_export import require as require_onnx

    require_onnx()


def check(settings, dtype, device: str) -> None:
    require()
    if device != "cpu":
        raise EWQError("the onnxruntime backend runs on the CPU here; pass --device cpu")
    if dtype != torch.float32:
        raise EWQError("the onnxruntime backend runs in float32 only; pass --dtype float32")
    outlier_channels.check_count(settings.outlier_channels)


def cannot_save(precisions, device: str):
    return "an ONNX Runtime model is written with python -m ewq.export onnx --plan PLAN --model M --out DIR"


def unsupported(shape, precision: str, settings):
    return None


def session_options(threads: int | None = None, spinning: bool = True):
    """How every ONNX Runtime session here runs: all graph optimizations (the fusions users get), `threads` intra-op
    threads (default: torch's, so both executors use the same cores), one inter-op thread. `spinning` False: idle
    threads sleep at once (the sweep holds hundreds of one-layer sessions; spinning pools would starve the cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def session(model, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session of a file path or of serialized model bytes."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, session_options(threads, spinning),
                                providers=["CPUExecutionProvider"])


def linear_graph(weight: torch.Tensor, bias):
    """x [n, in] -> x @ W^T (+ b) as torch.onnx.export writes a Linear (MatMul on the transposed weight, then
    Add(bias, product)), so ONNX Runtime quantizes and fuses it as it does inside the exported encoder."""
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = weight.shape
    nodes = [helper.make_node("MatMul", ["x", "weight_t"], ["product"], name="matmul")]
    inits = [numpy_helper.from_array(weight.detach().float().T.contiguous().numpy(), "weight_t")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["bias", "product"], ["y"], name="add"))
        inits.append(numpy_helper.from_array(bias.detach().float().contiguous().numpy(), "bias"))
    else:
        nodes[0].output[0] = "y"
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_f])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_f])], inits)
    from ..onnx_export import OPSET

    # IR version 8 goes with opset 17 (what torch.onnx.export writes); onnx's newest default is past ONNX Runtime's
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def quantized_linear_bytes(weight: torch.Tensor, bias, outliers=None) -> bytes:
    """The one-Linear graph after ONNX Runtime's quantizer (the same call the export makes), serialized; `outliers`
    (input channel indices or None) split out of the int8 product as the export splits them."""
    from ..onnx_export import quantize, split_outliers

    graph = linear_graph(weight, bias)
    if outliers is not None and len(outliers):
        split_outliers(graph.graph, "matmul", [int(c) for c in outliers])
    with tempfile.TemporaryDirectory(prefix="ewq-ort-layer-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph.SerializeToString())
        quantize(src, dst, ["matmul"])
        return dst.read_bytes()


class OrtLinear(nn.Module):
    """A Linear whose product ONNX Runtime computes: its int8 weights, per-tensor dynamic activations, its kernel.
    Inference only (no autograd); float32 on the CPU."""

    def __init__(self, weight: torch.Tensor, bias, outliers=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.outliers = 0 if outliers is None else len(outliers)
        self.model_bytes = quantized_linear_bytes(weight, bias, outliers)
        # one thread: the int32 products are exact and each output's float scaling the same whatever the split,
        # so the numbers are the file's at any thread count; and many such sessions must not each spin a pool
        self.session = session(self.model_bytes, threads=1, spinning=False)
        # int8 weights + a scale per row, and the outlier channels' float32 rows
        self.weight_bytes = self.out_features * (self.in_features + 4 + 4 * self.outliers)
        self.bias_bytes = 0 if bias is None else 4 * self.out_features

    def forward(self, x):
        shape = x.shape
        flat = x.detach().reshape(-1, self.in_features).float().contiguous().numpy()
        y = self.session.run(None, {"x": flat})[0]
        return torch.from_numpy(y).reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, onnxruntime dynamic int8 "
                f"per-channel, outlier_channels={self.outliers}")


def quantize_layer(module, precision: str, settings, dtype, device: str = "cpu"):
    if precision != "8-bit":
        raise EWQError(f"ONNX Runtime's dynamic quantization has no {precision}; plan raw and 8-bit only")
    outlier_channels.require_prepared(module, settings.outlier_channels)
    weight, bias = float_weight(module)
    return OrtLinear(weight, bias, outlier_channels.of(module))


def needs_calibration(settings) -> bool:
    return bool(settings.outlier_channels)


def prepare(model, layers: dict, batches, settings) -> dict | None:
    """With outlier_channels on: each 8-bit matrix's outlier input channels chosen on calibration `batches` with ONNX
    Runtime's own kernel (ewq/outliers.py), attached to the float layers for quantize_layer and the export."""
    if not needs_calibration(settings):
        return None
    return outlier_channels.prepare(model, layers, batches, lambda layer, picked: OrtLinear(*float_weight(layer), picked),
                                    int(settings.outlier_channels))


def state_bytes(module) -> int:
    return getattr(module, "weight_bytes", 0) + getattr(module, "bias_bytes", 0)


def dequantize(module):
    return None  # activations are quantized per call: the fast sweep runs the layer itself


def formats(settings) -> dict:
    from ..onnx_export import FORMAT_8BIT

    k = int(settings.outlier_channels)
    extra = f"; up to {k} outlier input channel{'s' if k > 1 else ''} per matrix in float32 beside it" if k else ""
    return {"8-bit": FORMAT_8BIT + extra}


# ---- a whole exported encoder, for the encoder suite and the service ----

class OrtEncoder:
    """An exported encoder run by one ONNX Runtime session, duck-typing a transformers encoder for Embedder.batch:
    called with the tokenizer's tensors, it returns an object with `last_hidden_state` (a torch tensor)."""

    def __init__(self, onnx_path, threads: int | None = None):
        self.path = Path(onnx_path)
        self.session = session(self.path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch):
        from types import SimpleNamespace

        feeds = {name: np.ascontiguousarray(batch[name].cpu().numpy(), dtype=np.int64) if name in batch else
                 np.zeros(tuple(batch["input_ids"].shape), dtype=np.int64) for name in self.inputs}
        hidden = self.session.run(None, feeds)[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))

    def to(self, device):
        if str(device) != "cpu":
            raise EWQError("an ONNX model runs on the CPU here (ONNX Runtime's CPU provider); pass --device cpu")
        return self

    def eval(self):
        return self


def file_weight_bytes(onnx_path, precisions_by_node: dict) -> dict:
    """The result's memory figures from the file: bytes of its initializers by precision ("8-bit": the quantized
    matrices' int8 weights with their scales and zero points; "raw": the plan's float matrices; "other": the rest,
    biases included). `precisions_by_node`: {exported MatMul name: precision}; ONNX Runtime's quantizer names the
    integer product `<name>_quant` and the weight's tensors `<weight>_quantized/_scale/_zero_point`."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    sizes = {i.name: numpy_helper.to_array(i).nbytes for i in graph.initializer}
    groups = {"raw": 0, "8-bit": 0, "4-bit": 0, "other": 0}
    counted = set()
    for node in graph.node:
        group = precisions_by_node.get(node.name.removesuffix("_quant"))
        if group is None or len(node.input) < 2:
            continue
        weight = node.input[1].removesuffix("_quantized")
        for name in (weight, f"{weight}_quantized", f"{weight}_scale", f"{weight}_zero_point"):
            if name in sizes and name not in counted:
                counted.add(name)
                groups[group] += sizes[name]
    groups["other"] = sum(v for k, v in sizes.items() if k not in counted)
    return groups


def prepare_run(args, kind, source, ckpt, tokenizer, device, plan, plan_path, fp, dtype, settings, suite) -> dict:
    """benchmark.py / benchmark_original.py --backend onnxruntime: the plan (the original: the raw plan, float32)
    written as an ONNX directory once (<plans-dir>/<name>-<plan hash>-onnx[-o<outlier channels>]-ort<version>, reused
    only for the same weights, plan, outlier setting and ONNX Runtime version), run by one ONNX Runtime session and measured by the encoder suite like any other row. The
    float torch model is loaded only to make the original's reference embeddings when they are not cached yet."""
    import time

    import onnxruntime as ort

    from ..apply import load_model
    from ..common import check_writable_dir
    from ..onnx_export import export_onnx, onnx_file, plan_precisions
    from ..plan import plan_hash

    require()
    if device != "cpu":
        raise EWQError("the onnxruntime executor runs on the CPU here; pass --device cpu")
    if ckpt.kind != "encoder":
        raise EWQError(f"{source.id} is a decoder; --backend onnxruntime runs encoders (for decoders use --backend "
                       f"llama.cpp or a torch executor)")
    for flag, given in (("--save", getattr(args, "save", False)), ("--device-map", getattr(args, "device_map", None)),
                        ("--max-memory", getattr(args, "max_memory", None)), ("--compile", args.compile)):
        if given:
            raise EWQError(f"{flag} with --backend onnxruntime: ONNX Runtime loads the exported file whole on the "
                           f"CPU{' (write it with python -m ewq.export onnx)' if flag == '--save' else ''}; drop {flag}")
    precisions = plan_precisions(plan)
    quality = suite.quality_inputs(args, source.path, ckpt.config, tokenizer, fp, dtype, device)
    if quality and quality["reference"] is None:
        float_model = load_model(source.path, dtype, ckpt.kind)
        quality["reference"] = suite.make_reference(float_model, quality, device, progress=not args.no_progress)
        del float_model
    plans_dir = args.plans_dir
    k = int(settings.outlier_channels)
    path = check_writable_dir(plans_dir) / (f"{source.path.name}-{plan_hash(plan)}-onnx{f'-o{k}' if k else ''}"
                                            f"-ort{ort.__version__}")
    start = time.perf_counter()
    existing = onnx_file(path) if path.is_dir() else None
    meta = _metadata(path) if existing else {}
    if existing and meta.get("plan_hash") == plan_hash(plan) and meta.get("base_fingerprint") == fp and \
            meta.get("outlier_channels", 0) == k:
        print(f"reusing {path} (exported earlier from the same weights and plan)")
    elif path.exists():
        raise EWQError(f"{path} exists but is not this plan's ONNX export; move or delete it")
    else:
        export_onnx(plan, source, ckpt, path, fp, k)
        print(f"wrote {path}")
    export_s = time.perf_counter() - start
    meta = _metadata(path)
    start = time.perf_counter()
    model = OrtEncoder(onnx_file(path))
    quantized = set(meta.get("quantized_nodes", []))
    by_node = {n: "8-bit" if n in quantized else "raw" for n in meta.get("matrix_nodes", {}).values()}
    groups = file_weight_bytes(onnx_file(path), by_node)
    return dict(fingerprint=fp, plan=plan, plan_path=plan_path, settings=settings, dtype=dtype, model=model,
                load_s=time.perf_counter() - start, quantize_s=export_s, kept_raw=[], quality=quality,
                path_taken="onnxruntime-onnx", saved_to=str(path), prepared=meta.get("outliers") or None,
                weight_bytes={"by_type": groups, "blocks": groups["raw"] + groups["8-bit"], "precisions": precisions})


def _metadata(path) -> dict:
    import json

    return json.loads((Path(path) / "metadata.json").read_text(encoding="utf-8"))
