"""What benchmark.py and benchmark_original.py do: one runner, the scripts differ only in `kind`.

    checkpoint -> (plan) -> load with the plan applied block by block (apply.load_for_plan) -> on the device
    -> the model kind's suite (speed, memory, quality) -> result JSON in benchmark_results/

What every model kind shares lives here: arguments, finding the plan, loading and quantizing (or loading a
saved quantized model), weight bytes, the result file. What a kind measures lives in its own module, one per
kind (SUITES: generate.py for decoders, embed.py for encoders), each with the same functions:
    add_arguments(parser)   the flags only that kind takes (another kind refuses them)
    check_arguments(args)   their values, before any weight is read
    quality_inputs(...)     what quality is measured on, and the original's cached reference (or None)
    make_reference(...)     that reference, from the float model
    measure(args, ctx, weight_bytes) -> {tests, warmup_s, quality, settings, peak_gb, peak_during, speed, encoder?}
    format_result(result)   what the script prints
"""

import math
import time
from pathlib import Path

import psutil
import torch

from . import embed, executor, generate, probes
from .analysis import fingerprint as weights_fingerprint
from .apply import (
    Applied,
    check_backend,
    load_for_plan,
    load_model,
    parse_max_memory,
    weight_bytes_by_precision,
)
from .artifact import BACKENDS as SAVED_BACKENDS
from .artifact import check_fits, gguf_name, load_quantized, read_metadata, save_quantized, saved_settings
from .backends import (
    BACKENDS,
    GROUP_SIZES,
    QUANT_TYPES,
    QuantSettings,
    get_backend,
    llamacpp,
)
from .checkpoint import open_checkpoint
from .common import ArgumentParser, EWQError, check_writable_dir
from .device import DTYPES, pick_device, pick_dtype
from .export import tensor_types, write_gguf
from .plan import (
    BUILTIN_PLANS,
    builtin_plan,
    check_plan_matches,
    group_size_of,
    int8_activations_of,
    load_plan,
    plan_hash,
    plan_label,
    precisions_used,
    raw_bits_of,
)
from .result import RESULT_SCHEMA_VERSION, write_result
from .source import (
    DEFAULT_MODEL,
    DEFAULT_MODELS_DIR,
    ENCODER_MODEL,
    load_tokenizer,
    resolve_model,
)

SUITES = {generate.KIND: generate, embed.KIND: embed}  # model kind -> the module that measures it
MEASURES = {generate.KIND: "generation", embed.KIND: "sentence embeddings"}


def build_parser(kind: str) -> ArgumentParser:
    what = "the EWQ-quantized model (a plan applied)" if kind == "ewq" else "the original, unquantized model"
    p = ArgumentParser(prog="benchmark.py" if kind == "ewq" else "benchmark_original.py",
                       description=f"Benchmark {what}: speed, memory (and quality with --quality). "
                                   f"The last line of stdout is the path of the result JSON.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local directory, Hugging Face id, '{DEFAULT_MODEL}' (default, a decoder) or '{ENCODER_MODEL}' "
                        f"(an encoder). Decoders are measured by generating (tok/s, KL); encoders by embedding "
                        f"sentences (sentences/s, cosine to the original): the kind is read from the checkpoint")
    if kind == "ewq":
        p.add_argument("--plan", default=None,
                       help="plan JSON from main_cache_model.py, or a built-in baseline: "
                            f"{', '.join(BUILTIN_PLANS)} (default: the newest plan in --plans-dir for this model's weights)")
        p.add_argument("--backend", choices=BACKENDS, default=None,
                       help="default: a saved model's own executor; else torch-dynamic when one of its options is "
                            "given, else the executor (torchao or bitsandbytes) and mode a short probe of this machine "
                            "finds fastest (printed, cached). bitsandbytes (the published proof of concept's executor, "
                            "eager): LLM.int8 (activations int8 too) / nf4 or fp4; torchao: weight-only int8 per row / "
                            "int4 with HQQ scales per group (see docs/RESULTS.md); torch-dynamic: torch's dynamic int8 "
                            "PTQ on the CPU for 8-bit entries (4-bit refused); llama.cpp (optional extra "
                            "llama-cpp-python, see README): the plan written as a GGUF and run by llama.cpp on the CPU; "
                            "8-bit/4-bit entries become Q8_0/Q4_0, a llama.cpp plan's ggml types are kept; onnxruntime "
                            "(encoders, CPU): the plan exported as an ONNX file (python -m ewq.export onnx: int8 "
                            "per-channel, dynamic 8-bit activations) and run by ONNX Runtime")
        p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                       help="torchao int4 group size (default: the plan's, else 64; 32/64/128 on the CPU). The embedded "
                            "SmolLM2 went through GGUF Q4_1 with groups of 32, so 32-groups re-find its grid and look "
                            "near-lossless there: draw no conclusion from --group-size 32 on that model")
        p.add_argument("--int8-activations", action="store_true",
                       help="torchao: 8-bit layers also quantize activations, one scale per token (int8 x int8 matmul; "
                            "Int8DynamicActivationInt8WeightConfig). Faster where the work is compute-bound (encoders, "
                            "prefill); on by default when the plan was measured with it")
        p.add_argument("--weight-scales", choices=("tensor", "channel"), default=None,
                       help="torch-dynamic: one int8 weight scale per matrix (tensor, torch's default) or per output "
                            "row (channel, as ONNX Runtime's per_channel)")
        p.add_argument("--act-bits", type=int, choices=(7, 8), default=None,
                       help="torch-dynamic: activations quantized to 7 bits (torch's default reduce_range, exact on "
                            "every x86 CPU) or the full 8 (half the rounding error; refused where a probe finds the "
                            "int8 kernel inexact: it needs AVX512-VNNI or AVX-VNNI)")
        p.add_argument("--outlier-channels", type=int, default=None, metavar="K",
                       help="torch-dynamic and onnxruntime, encoders: up to K (0-8) input channels per matrix whose "
                            "activations dwarf "
                            "the others are multiplied in fp32 beside the int8 product, chosen per matrix on 128 "
                            "calibration sentences (loads the float model whole). With --weight-scales channel "
                            "--act-bits 8 --outlier-channels 8 MiniLM-L6 keeps cosine 0.998 (see docs/RESULTS.md)")
        p.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4",
                       help="bitsandbytes: 4-bit data type (default nf4; the other executors do not read it)")
        p.add_argument("--double-quant", action="store_true",
                       help="bitsandbytes: also quantize the 4-bit absmax statistics")
        p.add_argument("--int8-threshold", type=float, default=6.0,
                       help="bitsandbytes: LLM.int8 outlier threshold on activations (default 6.0; 0 disables the fp16 "
                            "outlier path)")
        p.add_argument("--plans-dir", default="quantized_models",
                       help="where plans are looked for, --save writes and --backend llama.cpp / onnxruntime write "
                            "(and reuse) the plan's GGUF / ONNX directory (default quantized_models/)")
        p.add_argument("--save", action="store_true",
                       help="also save the quantized model to <plans-dir>/<name>-<plan hash>-<settings digest>/ "
                            "(safetensors, plan, metadata.json; the digest covers the executor, its settings, the "
                            "dtype and the device, and is left out for bitsandbytes at its defaults on the CPU); pass "
                            "that directory as --model later to skip quantizing. bitsandbytes, torchao and "
                            "torch-dynamic (--backend llama.cpp writes its GGUF to --plans-dir anyway). A torchao save "
                            "is also a model plain transformers loads (config.json carries its quantization_config; "
                            "CPU int4 needs `import ewq.hf` first, see README)")
        p.add_argument("--device-map", choices=("auto",), default=None,
                       help="auto: place the model under --max-memory as accelerate does (transformers' device_map): "
                            "quantized blocks fill the run devices in order (GPU after GPU), whole raw blocks go where "
                            "room is left, then to the CPU (GPU runs), then stay on disk and are read at each forward. "
                            "For checkpoints bigger than the device; default: the whole model on the device. Not with "
                            "--backend llama.cpp, which loads its GGUF whole")
        p.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="weights allowed on the run device (8GB, 7.5GiB) or per device (cuda:0=20GB,cuda:1=20GB,"
                            "cpu=60GB: quantized blocks fill GPU after GPU, torchao only); implies --device-map auto. "
                            "Default: 90%% of what is free. Not with --backend llama.cpp")
    if kind == "original":
        p.add_argument("--plans-dir", default="quantized_models",
                       help="where --backend llama.cpp / onnxruntime write (and reuse) the original's GGUF / ONNX "
                            "export (default quantized_models/)")
        p.add_argument("--backend", choices=("llama.cpp", "onnxruntime"), default=None,
                       help="llama.cpp: run the original as a GGUF file in llama.cpp (F16 for an fp16 checkpoint, else "
                            "BF16), the same way --backend llama.cpp runs quantized plans, so they compare in one mode; "
                            "onnxruntime (encoders): the original exported to ONNX (float32) and run by ONNX Runtime, "
                            "as --backend onnxruntime runs plans; default: transformers in torch")
    cpu_only = "--backend torch-dynamic and llama.cpp run" if kind == "ewq" else "--backend llama.cpp runs"
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help=f"auto: cuda if available, else cpu ({cpu_only} on the cpu only)")
    by_executor = ("float32 for --backend torch-dynamic; bfloat16 for --backend torchao on cuda" if kind == "ewq" else
                   "bfloat16 on cuda where the executor probe picks torchao: the original runs as the quantized "
                   "variants do")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help=f"run dtype of raw blocks and activations (default float16 on cuda, bfloat16 on cpu for "
                        f"decoders, float32 on cpu for encoders; {by_executor}). With --backend llama.cpp raw tensors "
                        f"keep the checkpoint's 16-bit type (F16 or BF16) in the GGUF, and --dtype sets only the torch "
                        f"reference's")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per prompt (decoders) or per batch size (encoders); median, min, max reported "
                        "(default 3)")
    p.add_argument("--quality", action="store_true",
                   help="decoders: also measure perplexity, KL(original || this) and top-1 agreement on text windows "
                        "(encoders always measure cosine and neighbour agreement to the original's embeddings)")
    p.add_argument("--eval-text", default=None,
                   help="UTF-8 text file for the quality measurement: decoders' --quality windows, encoders' evaluation "
                        "sentences (default: lee_background.cor from gensim)")
    p.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where fetched/converted models live")
    p.add_argument("--out-dir", default="benchmark_results",
                   help="where the result JSON goes (default benchmark_results/); the original's reference outputs "
                        "are cached in its .reference/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.kind_flags = {}  # model kind -> [(flag, dest, default)] of the flags only that kind takes
    for model_kind, suite in SUITES.items():
        group = p.add_argument_group(f"{model_kind}s only")
        suite.add_arguments(group)
        p.kind_flags[model_kind] = [(a.option_strings[0], a.dest, a.default, a.const) for a in group._group_actions]
    return p


def find_plan(spec, source, ckpt, fingerprint: str, plans_dir, model_spec: str, raw_bits: int = 16):
    """(plan, path or None): a built-in baseline, the given file, or the newest plan for these weights."""
    if spec in BUILTIN_PLANS:
        return builtin_plan(spec, source, ckpt, fingerprint, raw_bits), None
    if spec:
        plan, path = load_plan(spec), Path(spec)
    else:
        matches = []
        for candidate in sorted(Path(plans_dir).glob("quant_plan_*.json"), key=lambda f: f.stat().st_mtime):
            try:
                plan = load_plan(candidate)
            except EWQError:
                continue
            if plan["model"]["fingerprint"] == fingerprint:
                matches.append((candidate, plan))
        if not matches:
            raise EWQError(f"no plan for this model's weights in {plans_dir}/; make one with: "
                           f"python main_cache_model.py --model {model_spec}")
        path, plan = matches[-1]
    check_plan_matches(plan, fingerprint, len(ckpt.blocks), path, ckpt.kind)
    return plan, path


def check_memory(ckpt, dtype: torch.dtype, device: str, plan: dict, whole_float: bool = True):
    """Refuse early, with numbers, rather than die of an out-of-memory kill half way. The original exists whole in
    the run dtype; a plan applied while loading needs its quantized weights plus one float block."""
    params = sum(t.numel for t in ckpt.tensors)
    ratio = torch.finfo(dtype).bits / raw_bits_of(plan)
    block = max(b.params for b in ckpt.blocks) * torch.finfo(dtype).bits / 8
    if whole_float:
        need = params * torch.finfo(dtype).bits / 8 / 1e9
    else:  # on a GPU the CPU holds one float block at a time; on the CPU the quantized model grows beside it
        need = ((plan["size"]["model_bytes_after"] * ratio if device == "cpu" else 0) + block) / 1e9
    free = psutil.virtual_memory().available / 1e9
    if need > 0.95 * free:
        raise EWQError(f"out of memory: the weights need {need:.2f} GB in {dtype} on the CPU, {free:.2f} GB is free; "
                       f"close other programs, use a machine with more RAM, or place the model with --max-memory")
    if device == "cuda":
        ratio = torch.finfo(dtype).bits / raw_bits_of(plan)
        need_gpu = plan["size"]["model_bytes_after"] * ratio / 1e9
        free_gpu = torch.cuda.mem_get_info()[0] / 1e9
        if need_gpu > 0.95 * free_gpu:
            raise EWQError(f"out of GPU memory: the weights need {need_gpu:.2f} GB, {free_gpu:.2f} GB is free on "
                           f"{torch.cuda.get_device_name()}; free the GPU or choose a smaller plan")


def prepare(args, kind: str):
    """Resolve model and plan, load, quantize (or load a saved quantized model), move to the device.
    Returns everything the measurements need."""
    device = pick_device(args.device)
    if kind == "ewq" and args.backend == "torch-dynamic" and device != "cpu":
        raise EWQError("the torch-dynamic backend runs on the CPU only; pass --device cpu")
    source = resolve_model(args.model, args.models_dir)
    ckpt = open_checkpoint(source.path)
    check_kind_flags(args, ckpt.kind)
    tokenizer = load_tokenizer(source.path)  # refuses a checkpoint without one before any weight is read
    meta = read_metadata(source.path)
    saved = bool(meta and meta.get("is_quantized"))
    executor_choice = resolve_executor(args, kind, source, ckpt, meta if saved else None, device)
    if args.compile:
        generate.check_compiler(device)
    if saved:
        ctx = prepare_saved(args, kind, source, ckpt, meta, tokenizer, device)
    else:
        ctx = prepare_from_checkpoint(args, kind, source, ckpt, tokenizer, device)
    if device != "cpu" and not getattr(ctx["model"], "hf_device_map", None):  # (a placed model is where it goes)
        ctx["model"].to(device)
    return dict(ctx, source=source, ckpt=ckpt, device=device, tokenizer=tokenizer, executor=executor_choice)


def resolve_executor(args, kind: str, source, ckpt, meta, device: str) -> dict:
    """Settle the executor and the mode before any weight is read: the user's flags, a saved model's metadata, or,
    with no executor flag, the probe of this machine (executor.py). The original is timed in the mode of the
    executor the probe picks, so a quantized variant and its original always run the same way. Sets args.backend
    (quantized runs) and args.compile; returns how they were decided, for the result file."""
    backend_given = args.backend is not None
    if kind == "ewq" and meta:  # a saved model: its executor is in its metadata; the probe picks its mode
        backend = SAVED_BACKENDS.get(meta.get("method"))
        if backend is None or args.compile is not None or not get_backend(backend).COMPILES:
            args.compile = bool(args.compile)
            return {"chosen_by": "flags" if args.compile else "default (eager)", "backend": backend,
                    "compile": args.compile}
        choice = executor.choose(executor.Layout.of_plan(load_plan(source.path / "plan.json")), device,
                                 lambda b: getattr(torch, meta["dtype"]), not args.no_progress, backend=backend)
        args.compile = choice.compile
        print(f"mode: {'compiled' if choice.compile else 'eager'} (the faster for this saved {backend} model on this "
              f"machine: {choice.why})")
        return {"chosen_by": "probe", "backend": backend, "compile": choice.compile, "why": choice.why}
    if kind == "ewq" and not backend_given and dynamic_flags(args):  # options only torch-dynamic has (not probed)
        args.backend = "torch-dynamic"
        backend_given = True
    if backend_given or (kind == "original" and args.compile is not None):
        args.compile = bool(args.compile)  # executor flags given: nothing is probed, eager unless --compile
        return {"chosen_by": "flags", "backend": args.backend if kind == "ewq" else None, "compile": args.compile}
    if kind == "original" and ckpt.kind == "encoder":
        args.compile = False
        return {"chosen_by": "encoders run eager", "backend": None, "compile": False}
    implied = None  # an option only one executor has narrows the probe to that executor
    if kind == "ewq" and (args.group_size is not None or args.int8_activations):
        implied = "torchao"
    elif kind == "ewq" and (args.quant_type != QuantSettings.quant_type or args.double_quant
                            or args.int8_threshold != QuantSettings.threshold):
        implied = "bitsandbytes"
    choice = executor.choose(executor.Layout.of_checkpoint(ckpt), device,
                             lambda b: pick_dtype(args.dtype, device, b, ckpt.kind), not args.no_progress,
                             backend=implied, compile=args.compile)
    args.compile = choice.compile
    if kind == "ewq":
        args.backend = choice.backend
        print(f"executor: {choice.label} (chosen by measurement on this machine: {choice.why})")
    else:
        args.backend_for_dtype = choice.backend
        print(f"mode: {'compiled' if choice.compile else 'eager'}, the mode of this machine's fastest executor "
              f"({choice.label}): the original is timed as the quantized variants are ({choice.why})")
    return {"chosen_by": "probe", "backend": choice.backend, "compile": choice.compile, "why": choice.why}


def dynamic_flags(args) -> list:
    """The torch-dynamic executor options given on the command line."""
    return flags_given((("--weight-scales", args.weight_scales, None), ("--act-bits", args.act_bits, None),
                        ("--outlier-channels", args.outlier_channels, None)))


def check_compiles(args, backend_name: str, saved: bool = False) -> None:
    """--compile with a backend whose layers do not compile is refused before any weight is read."""
    backend = get_backend(backend_name)
    if args.compile and not backend.COMPILES:
        what = f"{args.model} was saved with the {backend_name} backend" if saved else f"--backend {backend_name}"
        raise EWQError(f"--compile with {what}: {backend.COMPILE_NOTE}; "
                       f"{'save it with --backend torchao' if saved else 'use --backend torchao'}, or drop --compile")


def flags_given(flags) -> list:
    """The flags set away from their defaults: [(flag, value, default)] -> [flag]."""
    return [flag for flag, value, default in flags if value != default]


def check_kind_flags(args, model_kind: str) -> None:
    """Flags that measure another kind of model are refused, not silently ignored."""
    for other, flags in args.kind_flags.items():
        if other == model_kind:
            continue
        given = flags_given((flag, getattr(args, dest), default) for flag, dest, default, const in flags
                            if const is None or getattr(args, dest) == const)  # --compile / --eager share a dest
        if given:
            raise EWQError(f"{args.model} is {'an' if model_kind == 'encoder' else 'a'} {model_kind}; {', '.join(given)} "
                           f"{'does' if len(given) == 1 else 'do'} not apply to it (they measure {MEASURES[other]}); "
                           f"drop {'it' if len(given) == 1 else 'them'}")


def prepare_from_checkpoint(args, kind, source, ckpt, tokenizer, device) -> dict:
    """A checkpoint: the original loaded whole, or a plan applied while loading (one float block at a time, so the
    float model never exists whole; see apply.load_for_plan)."""
    in_llamacpp = args.backend == "llama.cpp"  # a quantized variant's executor, or how the original runs
    in_onnxruntime = args.backend == "onnxruntime"  # (the same: a file exported once, run by ONNX Runtime)
    backend_name = (args.backend if kind == "ewq" or in_llamacpp or in_onnxruntime
                    else getattr(args, "backend_for_dtype", None)) \
        or QuantSettings.backend
    if kind == "ewq":
        if args.int8_activations and backend_name != "torchao":
            raise EWQError("--int8-activations applies to --backend torchao only (bitsandbytes' LLM.int8 and "
                           "torch-dynamic always quantize activations, per tensor)")
        only_dynamic = [f for f in dynamic_flags(args)
                        if not (backend_name == "onnxruntime" and f == "--outlier-channels")]
        if only_dynamic and backend_name != "torch-dynamic":
            raise EWQError(f"{', '.join(only_dynamic)} applies to --backend torch-dynamic only, not {backend_name}")
        if args.group_size is not None and backend_name != "torchao":
            raise EWQError(f"--group-size applies to --backend torchao only ({backend_name} 4-bit uses groups of 64)")
        check_compiles(args, backend_name)
    placed = kind == "ewq" and (args.device_map or args.max_memory) is not None
    if placed and args.compile:
        raise EWQError("--compile with --device-map/--max-memory: blocks left on disk are read by hooks at every "
                       "forward, which torch.compile cannot trace; drop --compile")
    if placed and args.save:
        raise EWQError("--save with --device-map/--max-memory: a saved model holds every weight; drop --save, or save "
                       "from a run where the whole model fits")
    max_memory = parse_max_memory(args.max_memory, device) if kind == "ewq" and args.max_memory else None
    fp = weights_fingerprint(ckpt, progress=not args.no_progress)
    dtype = pick_dtype(args.dtype, device, backend_name, ckpt.kind)
    raw_bits = torch.finfo(dtype).bits  # what a raw weight costs in this run (built-in plans are sized with it)
    if kind == "ewq":
        plan, plan_path = find_plan(args.plan, source, ckpt, fp, args.plans_dir, args.model, raw_bits)
        settings = QuantSettings(backend_name, args.quant_type, args.double_quant, args.int8_threshold,
                                 args.group_size or group_size_of(plan),
                                 args.int8_activations or int8_activations_of(plan),
                                 weight_scales=args.weight_scales or QuantSettings.weight_scales,
                                 act_bits=QuantSettings.act_bits if args.act_bits is None else args.act_bits,
                                 outlier_channels=QuantSettings.outlier_channels if args.outlier_channels is None
                                 else args.outlier_channels)
    else:
        plan, plan_path = builtin_plan("raw", source, ckpt, fp, raw_bits), None
        settings = QuantSettings(args.backend) if in_llamacpp or in_onnxruntime else QuantSettings()
    if in_llamacpp:
        return prepare_llamacpp(args, kind, source, ckpt, tokenizer, device, plan, plan_path, fp, dtype, settings)
    if in_onnxruntime:
        from .backends.onnxruntime import prepare_run

        return prepare_run(args, kind, source, ckpt, tokenizer, device, plan, plan_path, fp, dtype, settings,
                           SUITES[ckpt.kind])
    if kind == "ewq":
        backend = check_backend(plan, settings, dtype, device)
        refusal = args.save and backend.cannot_save(precisions_used(plan), device)
        if refusal:
            raise EWQError(f"--save cannot save this plan with the {settings.backend} backend: {refusal}; drop --save, "
                           f"use a plan without those layers, or save with --backend bitsandbytes")
    if not placed:
        check_memory(ckpt, dtype, device, plan, whole_float=kind == "original")
    suite = SUITES[ckpt.kind]
    quality = suite.quality_inputs(args, source.path, ckpt.config, tokenizer, fp, dtype, device)

    start = time.perf_counter()
    if kind == "original" or (quality and quality["reference"] is None):
        model = load_model(source.path, dtype, ckpt.kind)
        if quality and quality["reference"] is None:  # the original's log-probs, made once and cached
            quality["reference"] = suite.make_reference(model, quality, device, progress=not args.no_progress)
    load_s = time.perf_counter() - start
    applied = Applied()
    if kind == "ewq":
        model = None  # (the float model, if the reference needed it, is freed before the quantized one is built)
        model, applied = load_for_plan(source.path, plan, settings, dtype, ckpt.kind, device,
                                       "auto" if placed else None, max_memory, progress=not args.no_progress)
    for line in applied.kept_raw:
        print(f"note: kept in {str(dtype).replace('torch.', '')}: {line}")
    on_disk = [k for k, v in (getattr(model, "hf_device_map", None) or {}).items() if v == "disk"]
    if on_disk:
        print(f"note: {len(on_disk)} raw blocks do not fit --max-memory and are read from disk at every forward "
              f"({', '.join(on_disk[:3])}{', ...' if len(on_disk) > 3 else ''}): expect slow decoding")
    saved_to = None
    if kind == "ewq" and args.save:
        saved_to, fresh = save_quantized(model, plan, source, fp, tokenizer, settings, dtype, args.plans_dir)
        print(f"{'saved' if fresh else 'already saved (left as it was)'}: {saved_to}")
    return dict(fingerprint=fp, plan=plan, plan_path=plan_path, settings=settings, dtype=dtype, model=model,
                load_s=load_s, quantize_s=applied.seconds, kept_raw=applied.kept_raw, prepared=applied.prepared,
                quality=quality, on_disk=on_disk,
                path_taken="quantized-from-checkpoint"
                if kind == "ewq" else "original-checkpoint", saved_to=str(saved_to) if saved_to else None)


def prepare_llamacpp(args, kind, source, ckpt, tokenizer, device, plan, plan_path, fp, dtype, settings) -> dict:
    """llama.cpp runs a file: the plan written as a GGUF once (<plans-dir>/<name>-<plan hash>-<types digest>.gguf,
    artifact.gguf_name: reused only for the same weights and the same ggml type for every tensor),
    loaded by llama.cpp and timed and scored by the same suite as the torch rows. The float torch model is loaded
    only to make the original's reference log-probs when they are not cached yet."""
    from transformers import GenerationConfig

    llamacpp.require()  # before any work: one line saying how to install it
    if device != "cpu":
        raise EWQError("the llama.cpp executor runs on the CPU here; pass --device cpu")
    if args.save:
        raise EWQError("--save with --backend llama.cpp: its model is the GGUF file this run writes to "
                       f"{args.plans_dir}/; drop --save")
    placing = flags_given((("--device-map", getattr(args, "device_map", None), None),
                           ("--max-memory", getattr(args, "max_memory", None), None)))
    if placing:
        raise EWQError(f"{', '.join(placing)} with --backend llama.cpp: llama.cpp loads the GGUF whole on the CPU; "
                       f"drop {'it' if len(placing) == 1 else 'them'}")
    unknown = sorted(precisions_used(plan) - {"raw"} - set(llamacpp.ACCEPTS))
    if unknown:
        raise EWQError(f"llama.cpp has no {', '.join(unknown)}; use a plan of ggml types or of raw/8-bit/4-bit")
    if not plan["blocks"] or not plan["blocks"][0].get("shapes"):
        raise EWQError("the plan does not list its matrices (an older plan); regenerate it with main_cache_model.py")
    suite = SUITES[ckpt.kind]
    quality = suite.quality_inputs(args, source.path, ckpt.config, tokenizer, fp, dtype, device)
    if quality and quality["reference"] is None:
        float_model = load_model(source.path, dtype, ckpt.kind)
        quality["reference"] = suite.make_reference(float_model, quality, device, progress=not args.no_progress)
        del float_model
    path = check_writable_dir(args.plans_dir) / gguf_name(source.id, plan, tensor_types(plan, ckpt))
    start = time.perf_counter()
    if path.is_file():
        print(f"reusing {path} (written earlier from the same weights and tensor types)")
    else:
        write_gguf(plan, source, ckpt, path, progress=not args.no_progress)
        print(f"wrote {path}")
    export_s = time.perf_counter() - start
    try:
        generation_config = GenerationConfig.from_pretrained(source.path)
    except OSError:
        generation_config = None
    start = time.perf_counter()
    model = llamacpp.LlamaCppModel(path, n_threads=torch.get_num_threads(), generation_config=generation_config,
                                   tokenizer=tokenizer)
    sizes = llamacpp.file_weight_bytes(path)
    return dict(fingerprint=fp, plan=plan, plan_path=plan_path, settings=settings, dtype=dtype, model=model,
                load_s=time.perf_counter() - start, quantize_s=export_s, kept_raw=[], quality=quality,
                path_taken="llama.cpp-gguf", saved_to=str(path), weight_bytes=sizes)


def prepare_saved(args, kind, source, ckpt, meta: dict, tokenizer, device) -> dict:
    """A model saved by --save: no re-quantization, its own plan, the base model's fingerprint."""
    if kind == "original":
        raise EWQError(f"{source.path} is a quantized model; benchmark_original.py needs the base model "
                       f"({meta.get('base_model')})")
    if args.plan:
        raise EWQError(f"{source.path} is a saved quantized model and carries its own plan; drop --plan")
    if args.save:
        raise EWQError(f"{source.path} is already a saved quantized model; drop --save")
    given = flags_given((
        ("--backend", args.backend, None), ("--group-size", args.group_size, None),
        ("--int8-activations", args.int8_activations, False), ("--quant-type", args.quant_type, QuantSettings.quant_type),
        ("--double-quant", args.double_quant, False), ("--int8-threshold", args.int8_threshold, QuantSettings.threshold)
    )) + dynamic_flags(args)
    if given:
        raise EWQError(f"{source.path} is a saved quantized model: its metadata.json sets the executor "
                       f"({meta.get('method')}); drop {', '.join(given)}")
    if args.dtype and args.dtype != meta.get("dtype"):
        raise EWQError(f"{source.path} was saved in {meta.get('dtype')}; drop --dtype or save again in {args.dtype}")
    if meta.get("method") in SAVED_BACKENDS:  # (an unknown method is refused by load_quantized, with its own message)
        check_compiles(args, SAVED_BACKENDS[meta["method"]], saved=True)
    if args.max_memory:
        check_fits(source.path, meta, device, parse_max_memory(args.max_memory, device))
    start = time.perf_counter()
    model, plan, meta = load_quantized(source.path, ckpt.kind)
    load_s = time.perf_counter() - start
    dtype, fp = getattr(torch, meta["dtype"]), meta["base_fingerprint"]
    suite = SUITES[ckpt.kind]
    quality = suite.quality_inputs(args, source.path, ckpt.config, tokenizer, fp, dtype, device)
    if quality and quality["reference"] is None:
        raise EWQError(suite.MISSING_REFERENCE.format(base=meta.get("base_path")))
    settings = saved_settings(meta)
    return dict(fingerprint=fp, plan=plan, plan_path=source.path / "plan.json", settings=settings, dtype=dtype,
                model=model, load_s=load_s, quantize_s=0.0, kept_raw=[], quality=quality, path_taken="saved-quantized",
                saved_to=None)


def variant_label(kind: str, plan: dict, settings, compiled: bool) -> str:
    """original / the plan's label, with the executor when it is not bitsandbytes and +compile when compiled."""
    label = "original" if kind == "original" else plan_label(plan)
    if settings.backend in ("llama.cpp", "onnxruntime"):
        return f"{label}@{settings.backend}" + (f"-o{settings.outlier_channels}" if settings.outlier_channels else "")
    if kind == "ewq" and settings.backend != "bitsandbytes":
        label += f"@{settings.backend}" + ("-a8" if settings.int8_activations else "")
        if settings.backend == "torch-dynamic" and settings.key() != {"backend": "torch-dynamic"}:
            label += f"-w{settings.weight_scales[0]}a{settings.act_bits}o{settings.outlier_channels}"
    return label + ("+compile" if compiled else "")


def run(kind: str, argv=None) -> Path:
    parser = build_parser(kind)
    args = parser.parse_args(argv)
    args.kind_flags = parser.kind_flags
    if args.repeats < 1:
        raise EWQError(f"--repeats must be at least 1, got {args.repeats}")
    if kind == "ewq" and not (math.isfinite(args.int8_threshold) and args.int8_threshold >= 0):
        raise EWQError(f"--int8-threshold must be a finite number >= 0, got {args.int8_threshold}")
    for suite in SUITES.values():
        suite.check_arguments(args)
    out_dir = check_writable_dir(args.out_dir)

    ctx = prepare(args, kind)
    device, plan = ctx["device"], ctx["plan"]
    if ctx.get("weight_bytes"):  # a GGUF run by llama.cpp: the file's tensors, by ggml type
        by_precision, block_bytes = ctx["weight_bytes"]["by_type"], ctx["weight_bytes"]["blocks"]
    else:
        by_precision = weight_bytes_by_precision(ctx["model"], plan)
        block_bytes = by_precision["raw"] + by_precision["8-bit"] + by_precision["4-bit"]
    weight_bytes = sum(by_precision.values())
    block_params = plan["size"]["block_params"]
    suite = SUITES[ctx["ckpt"].kind]
    measured = suite.measure(args, ctx, weight_bytes)
    result = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "kind": kind,
        "variant": variant_label(kind, plan, ctx["settings"], args.compile),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"id": ctx["source"].id, "path": str(ctx["source"].path), "fingerprint": ctx["fingerprint"],
                  "architecture": ctx["ckpt"].architecture, "block_count": len(ctx["ckpt"].blocks),
                  "model_kind": ctx["ckpt"].kind},
        "plan": None if kind == "original" else {
            "path": str(ctx["plan_path"]) if ctx["plan_path"] else None, "name": plan["method"]["name"],
            "hash": plan_hash(plan), "method": plan["method"], "counts": plan["counts"],
            "estimated_avg_bits_per_weight": plan["size"]["avg_bits_per_weight"],
            "matrix_counts": plan.get("matrix_counts"), "checks": plan.get("checks"),
            "precisions": [b["precision"] for b in sorted(plan["blocks"], key=lambda b: b["index"])],
            "matrices": {str(b["index"]): b["matrices"] for b in plan["blocks"] if b.get("matrices")} or None},
        "environment": {**probes.environment(device, ctx["dtype"], ctx["settings"], args.compile),
                        "executor_choice": ctx["executor"]},
        "settings": {**measured["settings"], "executor": ctx["settings"].key()},
        "load": {"path_taken": ctx["path_taken"], "load_s": ctx["load_s"], "quantize_s": ctx["quantize_s"],
                 "on_disk": ctx.get("on_disk", []),
                 "saved_to": ctx["saved_to"], "kept_raw": ctx["kept_raw"], "prepared": ctx.get("prepared"),
                 "warmup_s": measured["warmup_s"], "compile_warmup_s": measured["warmup_s"] if args.compile else None},
        "memory": {
            "weight_bytes": weight_bytes, "weight_gb": weight_bytes / 1e9, "weight_bytes_by_precision": by_precision,
            "block_avg_bits_per_weight": 8 * block_bytes / block_params,
            "peak_allocated_gb": measured["peak_gb"],
            "peak_source": "torch.cuda.max_memory_allocated" if device != "cpu" else
            f"process peak RSS (VmHWM) during the {measured['peak_during']}",
            "driver_process_gb": probes.driver_process_gb(device),
        },
        "speed": measured["speed"],  # decoders: generation; encoders measure sentences/s in `encoder`
        "tests": measured["tests"],
        "quality": measured["quality"],
        "encoder": measured.get("encoder"),
    }
    name_hash = plan_hash(plan) if kind == "ewq" else ctx["fingerprint"][:12]
    path = write_result(result, out_dir, name_hash)
    print(suite.format_result(result))
    warning = probes.competed(result["environment"])
    if warning:
        print(warning)
    return path
