"""Models that leave the tool: a plan written in a format another runtime loads.

    python -m ewq.export gguf --plan PLAN --model M --out OUT.gguf [--llama-quantize-args]
    python -m ewq.export gguf --model M --target Q4_K_M --out OUT.gguf      # plans here, then writes
    python -m ewq.export onnx --plan PLAN --model M --out DIR

gguf: the checkpoint as a GGUF file llama.cpp loads (ewq.gguf_export), one ggml type per tensor from the
plan. A llama.cpp plan (main_cache_model.py --backend llama.cpp) names ggml types for every matrix and for
the embeddings/output head; a torch-menu plan's 8-bit and 4-bit become Q8_0 and Q4_0 (the closest formats:
symmetric, blocks of 32), raw matrices and unplanned embeddings stay in the checkpoint's 16-bit type. Every type
is written directly, the k-quants too (ewq.ggml_quants packs them bit for bit as llama-quantize does);
--llama-quantize-args instead writes the k-quant matrices unquantized and prints the llama-quantize command that
finishes the file with llama.cpp's own quantizer. Without --plan, --target PRESET (or --target-bpw B) makes the
plan first, with the same package functions main_cache_model.py calls (planning.make_plan: the sensitivity sweep per
matrix over llama.cpp's formats, then the minimum-damage plan whose GGUF is no larger than the target).
"""

import os
import sys
from pathlib import Path

from . import onnx_export
from .analysis import fingerprint as weights_fingerprint
from .backends.llamacpp import (builtin_table_warning, check_speed, checked_decode_cost, ggml_type, is_builtin,
                                parse_formats, raw_type)
from .checkpoint import open_checkpoint
from .common import ArgumentParser, EWQError, run_cli
from .plan import check_plan_matches, layer_precision, load_plan, other_matrices
from .presets import file_stats
from .sensitivity import SWEEPS
from .source import DEFAULT_MODEL, DEFAULT_MODELS_DIR, resolve_model


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


def write_gguf(plan: dict, source, ckpt, out, llama_quantize: bool = False, progress: bool = True,
               imatrix=None, rounding: str = "llama-quantize", gptq_tokens: int | None = None,
               calib_text=None) -> dict:
    """Write the plan's GGUF for a checkpoint the plan was already matched to (fingerprint checked by the caller).
    imatrix: an ewq.imatrix.Imatrix whose importance rounds the matrices as llama-quantize --imatrix does (None:
    plain rounding). rounding "gptq": the block matrices rounded with error feedback on gptq_tokens tokens of
    calib_text (ewq.gptq; the importance, if any, still picks each block's scales)."""
    from .ggml_quants import quantize_to_bytes
    from .gguf_export import export_gguf, llama_layout, tensor_names, tensor_shapes

    if ckpt.kind != "decoder":
        raise EWQError(f"{source.id} is an encoder; llama.cpp runs the decoder layouts Llama, Mistral and Qwen2")
    if not plan["blocks"] or not plan["blocks"][0].get("shapes"):
        raise EWQError("the plan does not list its matrices (an older plan); regenerate it with main_cache_model.py")
    importance = metadata = None
    if imatrix is not None:
        from .imatrix import check_imatrix

        check_imatrix(imatrix, tensor_shapes(source.path), source.id)
        importance, metadata = imatrix.importance, imatrix.gguf_metadata()
    types = tensor_types(plan, ckpt)
    work = None
    if rounding == "gptq":
        from . import gptq

        work = gptq.work_dir_beside(out)
    try:
        rounded = None if work is None else gptq.round_plan(
            source, ckpt, types, importance, tensor_names(source.path), llama_layout(source.path), work,
            gptq_tokens or gptq.GPTQ_TOKENS, calib_text, progress)
        # (a GPTQ file has no key of its own: it is the plan's size to the byte)
        return export_gguf(source.path, Path(out), types, default_type=raw_type(ckpt), progress=progress,
                           quantize_fn=None if llama_quantize else quantize_to_bytes, strict=True,
                           model_name=source.id, importance=importance, imatrix_metadata=metadata, rounded=rounded)
    finally:
        if work is not None:
            gptq.remove(work)


def plan_imatrix(plan: dict, plan_path, imatrix_file=None, use_imatrix: bool = True):
    """The importance matrix a plan's file is rounded with: --imatrix FILE, else the one the plan's sweep measured
    with (its "imatrix" entry), else none (a plan made without one). --no-imatrix: none."""
    from .imatrix import load_imatrix

    if not use_imatrix:
        return None
    if imatrix_file is not None:
        return load_imatrix(imatrix_file)
    recorded = (plan.get("method") or {}).get("imatrix") or plan.get("imatrix")
    if not recorded or not recorded.get("file"):
        return None
    path = Path(recorded["file"])
    if not path.is_absolute():
        path = Path(plan_path).parent / path
    if not path.is_file():
        raise EWQError(f"the plan was measured with the importance matrix {path}, which is gone; pass --imatrix FILE "
                       f"or --no-imatrix (plain rounding), or make the plan again")
    return load_imatrix(path)


def export_plan_gguf(plan_path, model: str, out, models_dir=DEFAULT_MODELS_DIR, llama_quantize: bool = False,
                     progress: bool = True, imatrix_file=None, use_imatrix: bool = True,
                     rounding: str = "llama-quantize", gptq_tokens: int | None = None, calib_text=None) -> dict:
    """Write the plan file's GGUF; refuses, before writing anything, a plan made for other weights."""
    plan = load_plan(plan_path)
    source = resolve_model(model, models_dir)
    ckpt = open_checkpoint(source.path)
    if llama_quantize and imatrix_file is not None:
        raise EWQError("--llama-quantize-args leaves the rounding to llama-quantize: give it --imatrix FILE there, "
                       "not here")
    imatrix = plan_imatrix(plan, plan_path, imatrix_file, use_imatrix and not llama_quantize)
    check_plan_matches(plan, weights_fingerprint(ckpt, progress=progress), len(ckpt.blocks), plan_path, ckpt.kind)
    return write_gguf(plan, source, ckpt, out, llama_quantize, progress, imatrix, rounding, gptq_tokens, calib_text)


# what each step costs, measured on this repository's 2-core AVX-512 machine (docs/RESULTS.md, issue 26)
GGUF_COSTS = ("What each step costs, measured for SmolLM2-135M on this repository's 2-core AVX2 CPU while other jobs "
              "kept its load average near 10 (upper bounds; time grows with the parameters): reading and fingerprinting "
              "the checkpoint ~10 s; the sensitivity sweep per matrix over llama.cpp's ten formats 9-12 min, once per "
              "model, calibration text and rounding (cached: another --target on the same model skips it); choosing "
              "the plan, its whole-plan checks on the calibration text and writing the GGUF 2.5-7 min; sizing a "
              "--target preset ~2 s.")


def add_gguf_parser(formats):
    g = formats.add_parser("gguf", help="a GGUF file for llama.cpp (Llama, Mistral, Qwen2 layouts)",
                           description="Write a plan as a GGUF file that llama.cpp loads: one ggml type per tensor. "
                                       "Without --plan, --target or --target-bpw makes the plan here first. "
                                       + GGUF_COSTS)
    g.add_argument("--plan", default=None,
                   help="plan JSON from main_cache_model.py (a llama.cpp plan names ggml types; a torch plan's "
                        "8-bit/4-bit become Q8_0/Q4_0). Without it the plan is made here for --target/--target-bpw")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the checkpoint (directory, Hugging Face id, or '{DEFAULT_MODEL}', the default); with --plan "
                        f"its fingerprint must match the plan's")
    g.add_argument("--out", required=True, help="the .gguf file to write (written under a temporary name, then renamed)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--target", default=None, metavar="PRESET",
                      help="no --plan: make the plan so the file is no larger than the one this llama-quantize preset "
                           "(Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, Q3_K_M, Q2_K, ...) gives this checkpoint, sized "
                           "from llama-quantize's own per-tensor rules without running llama.cpp")
    size.add_argument("--target-bpw", type=float, default=None, metavar="B",
                      help="no --plan: make the plan for B bits per weight as llama-quantize prints them (all the "
                           "file's tensor bytes x 8 / all their elements, norms included)")
    g.add_argument("--formats", default=None,
                   help="no --plan: the ggml types the plan chooses from, comma-separated (default: llama.cpp's menu "
                        "of main_cache_model.py --backend llama.cpp)")
    g.add_argument("--speed", default=None, metavar="preset|F|any",
                   help="no --plan, --target PRESET: preset (default), the file also decodes no slower than the "
                        "preset's, by llama.cpp's CPU kernel time per weight of each format (a built-in table measured on "
                        "a CPU like this one: AVX2, or AVX-512 + AMX; or --decode-cost); a number F, at least F x the preset's speed (0.95 trades "
                        "5%% of it for quality); any: the size is the only limit (slower formats such as Q5_0 may then "
                        "buy quality)")
    g.add_argument("--decode-cost", default=None, metavar="FILE",
                   help="no --plan, --target PRESET: time --speed by the kernel costs measured on the CPU the file "
                        "will run on (the decode_cost.json of python bench/decode_cost.py there, ~15 minutes) instead "
                        "of the built-in table chosen by this CPU's flags (AVX2, or AVX-512 + AMX); other CPUs order "
                        "the formats differently")
    g.add_argument("--calib-text", default=None,
                   help="no --plan: UTF-8 calibration text for the sweep (default: the end of gensim's "
                        "lee_background.cor); evaluate on other text")
    g.add_argument("--calib-tokens", type=int, default=None,
                   help="no --plan: tokens of calibration text (default 512), from the end of the text")
    g.add_argument("--sweep", choices=SWEEPS, default=None,
                   help="no --plan: fast (default: second-order estimate of each matrix's KL) or exact (every matrix "
                        "and format run through the model: many times slower)")
    g.add_argument("--plans-dir", default="quantized_models",
                   help="no --plan: where the plan made here is written (default quantized_models/); an existing plan "
                        "for the same weights and settings is reused")
    im = g.add_mutually_exclusive_group()
    im.add_argument("--imatrix", default=None, metavar="FILE",
                    help="round every matrix as llama-quantize --imatrix FILE does, with this importance matrix "
                         "(llama-imatrix's GGUF or legacy .dat); default: the one the plan's sweep measured with")
    im.add_argument("--no-imatrix", action="store_true",
                    help="plain rounding (llama-quantize without --imatrix), whatever the plan was measured with")
    g.add_argument("--rounding", choices=("llama-quantize", "gptq"), default="llama-quantize",
                   help="llama-quantize (default): every weight to the nearest value of its block, as llama-quantize "
                        "(--imatrix) writes it, bit for bit; gptq: the same types, scales and size, each block "
                        "matrix rounded with error feedback on the calibration text's inputs (ewq.gptq; its own pass "
                        "over --gptq-tokens tokens, then one pass per matrix over its columns: about 2 minutes for "
                        "SmolLM2-135M on 2 cores, hours for 8B). The plan's own KL figures were measured with the "
                        "default rounding")
    g.add_argument("--gptq-tokens", type=int, default=None,
                   help="--rounding gptq: calibration tokens from the end of --calib-text (default 12288; below a "
                        "few thousand the rounding fits the calibration text and does worse on other text)")
    g.add_argument("--llama-quantize-args", action="store_true",
                   help="write k-quant matrices unquantized and print the llama-quantize command (its --tensor-type "
                        "arguments) with which llama.cpp's own quantizer turns this file into the plan")
    g.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where fetched/converted models live")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return g


PLANNING_FLAGS = (("--formats", "formats"), ("--calib-text", "calib_text"), ("--calib-tokens", "calib_tokens"),
                  ("--sweep", "sweep"), ("--speed", "speed"), ("--decode-cost", "decode_cost"))


def plan_for_target(args) -> Path:
    """Make (or reuse) the llama.cpp plan for --target/--target-bpw: planning.make_plan, as main_cache_model.py
    --method sensitivity --granularity matrix --backend llama.cpp does."""
    from .planning import make_plan

    if args.calib_tokens is not None and args.calib_tokens < 2:
        raise EWQError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    source = resolve_model(args.model, args.models_dir)
    if open_checkpoint(source.path).kind != "decoder":
        raise EWQError(f"{source.id} is an encoder; llama.cpp runs the decoder layouts Llama, Mistral and Qwen2")
    formats = parse_formats(args.formats)
    path, plan, reused = make_plan(args.model, method="sensitivity", granularity="matrix", backend="llama.cpp",
                                   target=args.target, target_bpw=args.target_bpw, calib_tokens=args.calib_tokens,
                                   calib_text=args.calib_text, formats=formats, sweep=args.sweep or "fast",
                                   models_dir=args.models_dir, out_dir=args.plans_dir, progress=not args.no_progress,
                                   imatrix="none" if args.no_imatrix else args.imatrix or "calibration",
                                   speed=args.speed or "preset", decode_cost=args.decode_cost)
    print(f"{'reused' if reused else 'made'} plan {path}")
    return path


def check_gguf_args(args) -> None:
    """Refuse, before any work, flag combinations that cannot mean what they say."""
    target = "--target" if args.target is not None else "--target-bpw" if args.target_bpw is not None else None
    if args.plan and target:
        raise EWQError(f"--plan already fixes every tensor's type; drop {target} (or drop --plan to plan for it here)")
    if not args.plan and not target:
        raise EWQError("give --plan PLAN, or --target PRESET / --target-bpw B to make the plan here")
    given = [flag for flag, name in PLANNING_FLAGS if getattr(args, name) is not None
             and not (name == "calib_text" and args.rounding == "gptq")]  # GPTQ's text too
    if args.plan and given:
        raise EWQError(f"{', '.join(given)} make a plan; with --plan there is none to make: drop them")
    if args.speed is not None and args.target is None:
        raise EWQError("--speed compares the file's decode speed with a preset's: it needs --target PRESET")
    if args.speed is not None:
        check_speed(args.speed)
    checked_decode_cost(args.decode_cost, args.target, args.speed or "preset")  # before the checkpoint is opened
    if args.gptq_tokens is not None and args.rounding != "gptq":
        raise EWQError("--gptq-tokens is the calibration of --rounding gptq; add --rounding gptq or drop it")
    if args.gptq_tokens is not None and args.gptq_tokens < 256:
        raise EWQError(f"--gptq-tokens must be at least 256 (one window; thousands to generalize), got {args.gptq_tokens}")
    if args.rounding == "gptq" and args.llama_quantize_args:
        raise EWQError("--llama-quantize-args leaves the rounding to llama-quantize; drop it or --rounding gptq")
    if target and args.llama_quantize_args:
        raise EWQError("--llama-quantize-args writes the k-quants unquantized, so the file cannot meet a size "
                       f"target; drop one of them")


def within_target(path: Path, plan: dict) -> dict:
    """The file's size and bits per weight; refuses (the caller removes the file) one larger than its plan's target."""
    stats = file_stats(path)
    target = plan["method"].get("target") or {}
    if "file_bytes" in target and stats["file_bytes"] > target["file_bytes"]:
        raise EWQError(f"the written GGUF has {stats['file_bytes']} bytes, more than {target['preset']}'s "
                       f"{target['file_bytes']}; nothing was written (please report this)")
    if "target_bpw" in target and stats["bpw"] > target["target_bpw"] + 1e-9:
        raise EWQError(f"the written GGUF has {stats['bpw']:.4f} bits per weight, more than the target "
                       f"{target['target_bpw']}; nothing was written (please report this)")
    return stats


def gguf_main(args) -> None:
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise EWQError(f"--out {out} is a directory; give the .gguf file's path")
    check_gguf_args(args)
    plan_path = Path(args.plan) if args.plan else plan_for_target(args)
    # a planned file is checked against its target under a temporary name before it takes out's name
    tmp = out if args.plan else out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        result = export_plan_gguf(plan_path, args.model, tmp, args.models_dir, args.llama_quantize_args,
                                  progress=not args.no_progress, imatrix_file=args.imatrix,
                                  use_imatrix=not args.no_imatrix, rounding=args.rounding,
                                  gptq_tokens=args.gptq_tokens, calib_text=args.calib_text)
        stats = within_target(tmp, load_plan(plan_path))
        os.replace(tmp, out)
    finally:
        if tmp != out:
            tmp.unlink(missing_ok=True)
    written = {}
    for t in result["written_types"].values():
        written[t] = written.get(t, 0) + 1
    print(f"wrote {out}: {stats['file_bytes'] / 1e6:.1f} MB ({stats['file_bytes']} bytes), {stats['bpw']:.4f} bits "
          f"per weight as llama-quantize counts them; " +
          ", ".join(f"{n} {t}" for t, n in sorted(written.items(), key=lambda kv: -kv[1])))
    method = load_plan(plan_path)["method"]
    target = method.get("target") or {}
    if "file_bytes" in target:
        print(f"target: llama-quantize {target['preset']}{' with an importance matrix' if target.get('imatrix') else ''} "
              f"gives this checkpoint {target['file_bytes']} bytes "
              f"({target['preset_bpw']} bits per weight); this file is {target['file_bytes'] - stats['file_bytes']} "
              f"bytes smaller")
    if "decode_cost" in method:
        print(f"decode time by llama.cpp's CPU kernel costs (--speed {target['speed']}): {method['decode_cost']['plan']:.3f}x the "
              f"preset's file (the size-only plan: {method['decode_cost']['without_limit']:.3f}x); kernel costs "
              f"{method['decode_cost'].get('table', 'built-in')}")
        warning = builtin_table_warning() if is_builtin(target.get("decode_cost")) else None
        if warning:
            print(warning, file=sys.stderr)
    elif str(target.get("speed", "")).startswith("any:"):
        print(f"decode speed not limited: {target['speed'][len('any: '):]}")
    print(f"plan: {plan_path}")
    if result["llama_quantize_command"]:
        print("finish it with llama.cpp's quantizer:")
        print(result["llama_quantize_command"])
    print(out)


def main(argv=None):
    p = ArgumentParser(prog="python -m ewq.export", description=__doc__.split("\n\n")[0])
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    add_gguf_parser(formats)
    onnx_export.add_parser(formats)
    args = p.parse_args(argv)
    if args.format == "onnx":
        return onnx_export.main(args)
    return gguf_main(args)

if __name__ == "__main__":
    sys.exit(run_cli(main))
