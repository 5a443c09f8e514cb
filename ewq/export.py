"""Models that leave the tool: a plan written in a format another runtime loads.

    python -m ewq.export gguf --plan PLAN --model M --out OUT.gguf [--llama-quantize-args]
    python -m ewq.export onnx --plan PLAN --model M --out DIR

gguf: the checkpoint as a GGUF file llama.cpp loads (ewq.gguf_export), one ggml type per tensor from the
plan. A llama.cpp plan (main_cache_model.py --backend llama.cpp) names ggml types for every matrix and for
the embeddings/output head; a torch-menu plan's 8-bit and 4-bit become Q8_0 and Q4_0 (the closest formats:
symmetric, blocks of 32), raw matrices and unplanned embeddings stay in the checkpoint's 16-bit type. Every type
is written directly, the k-quants too (ewq.ggml_quants packs them bit for bit as llama-quantize does);
--llama-quantize-args instead writes the k-quant matrices unquantized and prints the llama-quantize command that
finishes the file with llama.cpp's own quantizer.
"""

import sys
from pathlib import Path

from . import onnx_export
from .analysis import fingerprint as weights_fingerprint
from .backends.llamacpp import ggml_type
from .checkpoint import open_checkpoint
from .common import ArgumentParser, EWQError, run_cli
from .plan import check_plan_matches, layer_precision, load_plan, other_matrices
from .source import DEFAULT_MODEL, DEFAULT_MODELS_DIR, resolve_model


def raw_type(ckpt) -> str:
    """The lossless 16-bit type of the checkpoint's matrices (F16 for fp16 weights, BF16 otherwise)."""
    dtypes = {t.dtype for b in ckpt.blocks for t in b.matrices}
    return "F16" if dtypes == {"F16"} else "BF16"


def tensor_types(plan: dict, ckpt) -> dict:
    """{checkpoint tensor name: ggml type} for every block matrix and every planned embedding/head."""
    raw = raw_type(ckpt)
    prefix = plan["model"]["block_prefix"]
    types = {}
    for b in plan["blocks"]:
        for matrix in b["shapes"]:
            precision = layer_precision(b, matrix)
            types[f"{prefix}.{b['index']}.{matrix}.weight"] = raw if precision == "raw" else ggml_type(precision)
    for name, precision in other_matrices(plan).items():
        types[name] = raw if precision == "raw" else ggml_type(precision)
    return types


def write_gguf(plan: dict, source, ckpt, out, llama_quantize: bool = False, progress: bool = True) -> dict:
    """Write the plan's GGUF for a checkpoint the plan was already matched to (fingerprint checked by the caller)."""
    from .ggml_quants import quantize_to_bytes
    from .gguf_export import export_gguf

    if ckpt.kind != "decoder":
        raise EWQError(f"{source.id} is an encoder; llama.cpp runs the decoder layouts Llama, Mistral and Qwen2")
    if not plan["blocks"] or not plan["blocks"][0].get("shapes"):
        raise EWQError("the plan does not list its matrices (an older plan); regenerate it with main_cache_model.py")
    return export_gguf(source.path, Path(out), tensor_types(plan, ckpt), default_type=raw_type(ckpt),
                       progress=progress, quantize_fn=None if llama_quantize else quantize_to_bytes, strict=True,
                       model_name=source.id)


def export_plan_gguf(plan_path, model: str, out, models_dir=DEFAULT_MODELS_DIR, llama_quantize: bool = False,
                     progress: bool = True) -> dict:
    """Write the plan file's GGUF; refuses, before writing anything, a plan made for other weights."""
    plan = load_plan(plan_path)
    source = resolve_model(model, models_dir)
    ckpt = open_checkpoint(source.path)
    check_plan_matches(plan, weights_fingerprint(ckpt, progress=progress), len(ckpt.blocks), plan_path, ckpt.kind)
    return write_gguf(plan, source, ckpt, out, llama_quantize, progress)


def main(argv=None):
    p = ArgumentParser(prog="python -m ewq.export", description=__doc__.split("\n\n")[0])
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = formats.add_parser("gguf", help="a GGUF file for llama.cpp (Llama, Mistral, Qwen2 layouts)",
                           description="Write the plan as a GGUF file that llama.cpp loads: one ggml type per tensor.")
    g.add_argument("--plan", required=True, help="plan JSON from main_cache_model.py (a llama.cpp plan names ggml "
                                                 "types; a torch plan's 8-bit/4-bit become Q8_0/Q4_0)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the checkpoint the plan was made for (directory, Hugging Face id, or '{DEFAULT_MODEL}', "
                        f"the default); its fingerprint must match the plan's")
    g.add_argument("--out", required=True, help="the .gguf file to write (written under a temporary name, then renamed)")
    g.add_argument("--llama-quantize-args", action="store_true",
                   help="write k-quant matrices unquantized and print the llama-quantize command (its --tensor-type "
                        "arguments) with which llama.cpp's own quantizer turns this file into the plan")
    g.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where fetched/converted models live")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    onnx_export.add_parser(formats)
    args = p.parse_args(argv)
    if args.format == "onnx":
        return onnx_export.main(args)
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise EWQError(f"--out {out} is a directory; give the .gguf file's path")
    result = export_plan_gguf(args.plan, args.model, out, args.models_dir, args.llama_quantize_args,
                              progress=not args.no_progress)
    written = {}
    for t in result["written_types"].values():
        written[t] = written.get(t, 0) + 1
    print(f"wrote {result['path']}: {result['bytes'] / 1e6:.1f} MB, " +
          ", ".join(f"{n} {t}" for t, n in sorted(written.items(), key=lambda kv: -kv[1])))
    if result["llama_quantize_command"]:
        print("finish it with llama.cpp's quantizer:")
        print(result["llama_quantize_command"])
    print(result["path"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
