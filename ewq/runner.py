"""What benchmark.py and benchmark_original.py do: one runner, the scripts differ only in `kind`.

    checkpoint -> (plan) -> load on the CPU -> apply plan block by block -> move to device
    -> suite (speed, memory) -> (quality) -> result JSON in benchmark_results/
"""

import math
import time
from pathlib import Path

import psutil
import torch

from .apply import Applied, apply_plan, load_model, weight_bytes_by_precision
from .backends import BACKENDS, GROUP_SIZES, QUANT_TYPES, QuantSettings, get_backend
from .common import ArgumentParser, EWQError, check_writable_dir
from .apply import check_backend
from .plan import (BUILTIN_PLANS, builtin_plan, check_plan_matches, group_size_of, int8_activations_of, load_plan,
                   plan_hash, plan_label, precisions_used, raw_bits_of)
from .device import DTYPES, pick_device, pick_dtype
from .embed import EVAL_SENTENCES, SPEED_SENTENCES
from .quality import TOP_K, WINDOW
from .source import DEFAULT_MODEL, DEFAULT_MODELS_DIR, ENCODER_MODEL, load_tokenizer

CPU_EVAL_TOKENS, CUDA_EVAL_TOKENS = 4096, 16384


def build_parser(kind: str) -> ArgumentParser:
    from .bench import CPU_DEFAULT_NEW_TOKENS, CUDA_DEFAULT_NEW_TOKENS, task_names

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
                       help="bitsandbytes (default, the PoC's executor): Linear8bitLt (LLM.int8, activations int8 too) / "
                            "Linear4bit nf4/fp4; torchao: weight-only int8 per row / int4 with HQQ scales per group, "
                            "activations stay in the run dtype (faster and closer to the original; see docs/RESULTS.md); "
                            "torch-dynamic: torch's dynamic int8 PTQ on the CPU for 8-bit entries (4-bit refused)")
        p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                       help="torchao int4 group size (default: the plan's, else 64; 32/64/128 on the CPU). The embedded "
                            "SmolLM2 went through GGUF Q4_1 with groups of 32, so 32-groups re-find its grid and look "
                            "near-lossless there: draw no conclusion from --group-size 32 on that model")
        p.add_argument("--int8-activations", action="store_true",
                       help="torchao: 8-bit layers also quantize activations, one scale per token (int8 x int8 matmul; "
                            "Int8DynamicActivationInt8WeightConfig). Faster where the work is compute-bound (encoders, "
                            "prefill); on by default when the plan was measured with it")
        p.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4", help="bitsandbytes 4-bit data type (default nf4)")
        p.add_argument("--double-quant", action="store_true", help="also quantize the 4-bit absmax statistics")
        p.add_argument("--int8-threshold", type=float, default=6.0,
                       help="LLM.int8 outlier threshold on activations (default 6.0; 0 disables the fp16 outlier path)")
        p.add_argument("--plans-dir", default="quantized_models",
                       help="where plans are looked for and --save writes (default quantized_models/)")
        p.add_argument("--save", action="store_true",
                       help="also save the quantized model to <plans-dir>/<name>-<plan hash>/ (safetensors, plan, "
                            "metadata.json); pass that directory as --model later to skip quantizing. Every backend; "
                            "torchao's CPU int4 layers cannot be saved (torchao has no safetensors form for them)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile of the decode step (transformers' compiled generate); the "
                        "compile and warm-up time is reported apart from decode tok/s (about 2 minutes on a 2-core CPU). "
                        "Backends that do not compile (bitsandbytes, torch-dynamic) are refused with the reason")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="run dtype of raw blocks and activations (default float16 on cuda, bfloat16 on cpu for decoders, "
                        "float32 on cpu for encoders; float32 for --backend torch-dynamic; bfloat16 for --backend "
                        "torchao on cuda)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"exactly this many new tokens per prompt, EOS ignored (default {CUDA_DEFAULT_NEW_TOKENS} on cuda, "
                        f"{CPU_DEFAULT_NEW_TOKENS} on cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per prompt; median, min, max reported (default 3)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of: {', '.join(task_names())} (default all)")
    p.add_argument("--quality", action="store_true",
                   help="also measure perplexity, KL(original || this) and top-1 agreement on text windows")
    p.add_argument("--eval-text", default=None, help="UTF-8 text file for --quality (default: lee_background.cor from gensim)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help=f"tokens scored by --quality (default {CPU_EVAL_TOKENS} on cpu, {CUDA_EVAL_TOKENS} on cuda)")
    p.add_argument("--eval-window", type=int, default=WINDOW, help=f"tokens per non-overlapping window (default {WINDOW})")
    p.add_argument("--kl-top-k", type=int, default=TOP_K,
                   help=f"the original's top-k log-probs kept for KL; the rest is pooled into one bucket (default {TOP_K})")
    p.add_argument("--eval-sentences", type=int, default=None,
                   help=f"encoders: corpus sentences whose embeddings are compared with the original's (cosine, "
                        f"top-10 neighbours; default {EVAL_SENTENCES}). Encoders always measure this fidelity")
    p.add_argument("--speed-sentences", type=int, default=None,
                   help=f"encoders: sentences embedded at batch 1 and at batch 32 for sentences/s and latency "
                        f"(default {SPEED_SENTENCES})")
    p.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where fetched/converted models live")
    p.add_argument("--out-dir", default="benchmark_results", help="where the result JSON goes (default benchmark_results/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
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


def check_memory(ckpt, dtype: torch.dtype, device: str, plan: dict):
    """Refuse early, with numbers, rather than die of an out-of-memory kill half way."""
    params = sum(t.numel for t in ckpt.tensors)
    need = params * torch.finfo(dtype).bits / 8 / 1e9  # the float model exists once on the CPU before quantizing
    free = psutil.virtual_memory().available / 1e9
    if need > 0.95 * free:
        raise EWQError(f"out of memory: the weights need {need:.2f} GB in {dtype} on the CPU, {free:.2f} GB is free; "
                       f"close other programs or use a machine with more RAM")
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
    from .artifact import read_metadata
    from .checkpoint import open_checkpoint
    from .source import resolve_model

    device = pick_device(args.device)
    if kind == "ewq" and args.backend == "torch-dynamic" and device != "cpu":
        raise EWQError("the torch-dynamic backend runs on the CPU only; pass --device cpu")
    source = resolve_model(args.model, args.models_dir)
    ckpt = open_checkpoint(source.path)
    check_kind_flags(args, kind, ckpt.kind)
    tokenizer = load_tokenizer(source.path)  # refuses a checkpoint without one before any weight is read
    meta = read_metadata(source.path)
    if meta and meta.get("is_quantized"):
        ctx = prepare_saved(args, kind, source, ckpt, meta, tokenizer, device)
    else:
        ctx = prepare_from_checkpoint(args, kind, source, ckpt, tokenizer, device)
    if device != "cpu":
        ctx["model"].to(device)
    return dict(ctx, source=source, ckpt=ckpt, device=device, tokenizer=tokenizer)


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


def check_kind_flags(args, kind: str, model_kind: str) -> None:
    """Flags that measure the other kind of model are refused, not silently ignored."""
    if model_kind == "encoder":
        given = flags_given((
            ("--compile", args.compile, False), ("--max-new-tokens", args.max_new_tokens, None),
            ("--tasks", args.tasks, None), ("--eval-tokens", args.eval_tokens, None),
            ("--eval-window", args.eval_window, WINDOW), ("--kl-top-k", args.kl_top_k, TOP_K)))
        what = "they measure generation"
    else:
        given = flags_given((("--eval-sentences", args.eval_sentences, None),
                             ("--speed-sentences", args.speed_sentences, None)))
        what = "they measure sentence embeddings"
    if given:
        raise EWQError(f"{args.model} is {'an' if model_kind == 'encoder' else 'a'} {model_kind}; {', '.join(given)} "
                       f"{'does' if len(given) == 1 else 'do'} not apply to it ({what}); drop "
                       f"{'it' if len(given) == 1 else 'them'}")
    for flag, value in (("--eval-sentences", args.eval_sentences), ("--speed-sentences", args.speed_sentences)):
        if value is not None and value < 2:
            raise EWQError(f"{flag} must be at least 2, got {value}")


def prepare_from_checkpoint(args, kind, source, ckpt, tokenizer, device) -> dict:
    """The PoC's path: float checkpoint on the CPU, plan applied block by block."""
    from .analysis import fingerprint as weights_fingerprint

    backend_name = (args.backend if kind == "ewq" else None) or QuantSettings.backend
    if kind == "ewq":
        if args.int8_activations and backend_name != "torchao":
            raise EWQError("--int8-activations applies to --backend torchao only (bitsandbytes' LLM.int8 and "
                           "torch-dynamic always quantize activations, per tensor)")
        if args.group_size is not None and backend_name != "torchao":
            raise EWQError(f"--group-size applies to --backend torchao only ({backend_name} 4-bit uses groups of 64)")
        check_compiles(args, backend_name)
    fp = weights_fingerprint(ckpt, progress=not args.no_progress)
    dtype = pick_dtype(args.dtype, device, backend_name, ckpt.kind)
    raw_bits = torch.finfo(dtype).bits  # what a raw weight costs in this run (built-in plans are sized with it)
    if kind == "ewq":
        plan, plan_path = find_plan(args.plan, source, ckpt, fp, args.plans_dir, args.model, raw_bits)
        settings = QuantSettings(backend_name, args.quant_type, args.double_quant, args.int8_threshold,
                                 args.group_size or group_size_of(plan),
                                 args.int8_activations or int8_activations_of(plan))
    else:
        plan, plan_path, settings = builtin_plan("raw", source, ckpt, fp, raw_bits), None, QuantSettings()
    if kind == "ewq":
        backend = check_backend(plan, settings, dtype, device)
        refusal = args.save and backend.cannot_save(precisions_used(plan), device)
        if refusal:
            raise EWQError(f"--save cannot save this plan with the {settings.backend} backend: {refusal}; drop --save, "
                           f"use a plan without those layers, or save with --backend bitsandbytes")
    check_memory(ckpt, dtype, device, plan)
    encoder = ckpt.kind == "encoder"
    if encoder:
        quality = fidelity_inputs(args, source.path, ckpt.config, tokenizer, fp, dtype, device)
    else:
        quality = quality_inputs(args, tokenizer, fp, dtype, device) if args.quality else None

    start = time.perf_counter()
    model = load_model(source.path, dtype, ckpt.kind)
    load_s = time.perf_counter() - start
    if quality and quality["reference"] is None:  # the float model is here anyway: no reload later
        make_reference = embedding_reference if encoder else reference_from_float_model
        quality["reference"] = make_reference(model, quality, device, progress=not args.no_progress)
    applied = apply_plan(model, plan, settings, dtype, not args.no_progress, device) if kind == "ewq" else Applied()
    for line in applied.kept_raw:
        print(f"note: kept in {str(dtype).replace('torch.', '')}: {line}")
    saved_to = None
    if kind == "ewq" and args.save:
        from .artifact import save_quantized

        saved_to, fresh = save_quantized(model, plan, source, fp, tokenizer, settings, dtype, args.plans_dir)
        print(f"{'saved' if fresh else 'already saved (left as it was)'}: {saved_to}")
    return dict(fingerprint=fp, plan=plan, plan_path=plan_path, settings=settings, dtype=dtype, model=model,
                load_s=load_s, quantize_s=applied.seconds, kept_raw=applied.kept_raw, quality=quality,
                path_taken="quantized-from-checkpoint"
                if kind == "ewq" else "original-checkpoint", saved_to=str(saved_to) if saved_to else None)


def prepare_saved(args, kind, source, ckpt, meta: dict, tokenizer, device) -> dict:
    """A model saved by --save: no re-quantization, its own plan, the base model's fingerprint."""
    from .artifact import load_quantized

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
        ("--double-quant", args.double_quant, False), ("--int8-threshold", args.int8_threshold, QuantSettings.threshold)))
    if given:
        raise EWQError(f"{source.path} is a saved quantized model: its metadata.json sets the executor "
                       f"({meta.get('method')}); drop {', '.join(given)}")
    if args.dtype and args.dtype != meta.get("dtype"):
        raise EWQError(f"{source.path} was saved in {meta.get('dtype')}; drop --dtype or save again in {args.dtype}")
    from .artifact import BACKENDS

    if meta.get("method") in BACKENDS:  # (an unknown method is refused by load_quantized, with its own message)
        check_compiles(args, BACKENDS[meta["method"]], saved=True)
    start = time.perf_counter()
    model, plan, meta = load_quantized(source.path, ckpt.kind)
    load_s = time.perf_counter() - start
    dtype, fp = getattr(torch, meta["dtype"]), meta["base_fingerprint"]
    quality = None
    if ckpt.kind == "encoder":
        quality = fidelity_inputs(args, source.path, ckpt.config, tokenizer, fp, dtype, device)
    elif args.quality:
        quality = quality_inputs(args, tokenizer, fp, dtype, device)
    if quality and quality["reference"] is None:
        raise EWQError(f"no cached reference of the base model for these {'sentences' if ckpt.kind == 'encoder' else 'windows'}; "
                       f"run `python benchmark_original.py {'' if ckpt.kind == 'encoder' else '--quality '}--model "
                       f"{meta.get('base_path')}` with the same --eval-* settings first")
    settings = QuantSettings(BACKENDS[meta["method"]], meta["quant_type"], meta["double_quant"], meta["int8_threshold"],
                             meta.get("group_size", 64), meta.get("int8_activations", False))  # (absent before torchao saves)
    return dict(fingerprint=fp, plan=plan, plan_path=source.path / "plan.json", settings=settings, dtype=dtype,
                model=model, load_s=load_s, quantize_s=0.0, kept_raw=[], quality=quality, path_taken="saved-quantized",
                saved_to=None)


def quality_inputs(args, tokenizer, fingerprint: str, dtype, device: str) -> dict:
    """Corpus, windows and (if cached) the original's reference, checked before any model is loaded."""
    from . import quality

    if args.kl_top_k < 1:
        raise EWQError(f"--kl-top-k must be at least 1, got {args.kl_top_k}")
    n_tokens = args.eval_tokens or (CPU_EVAL_TOKENS if device == "cpu" else CUDA_EVAL_TOKENS)
    if n_tokens < 1:
        raise EWQError(f"--eval-tokens must be positive, got {n_tokens}")
    corpus = quality.load_corpus(args.eval_text)
    windows = quality.make_windows(tokenizer, corpus, n_tokens, args.eval_window)
    key = quality.reference_key(fingerprint, corpus, windows, dtype, device, args.kl_top_k)
    path = quality.cache_path(Path(args.out_dir) / ".reference", key)
    reference = quality.load_reference(path, key)
    return {"corpus": corpus, "windows": windows, "key": key, "path": path, "reference": reference,
            "cached": reference is not None}


def reference_from_float_model(model, q: dict, device: str, progress: bool) -> dict:
    from . import quality

    if device != "cpu":
        model.to(device)
    reference = quality.compute_reference(model, q["windows"], device, q["key"]["top_k"], progress)
    if device != "cpu":
        model.to("cpu")  # quantization happens on the CPU, as for every run
    quality.save_reference(q["path"], q["key"], reference)
    return reference


def measure_quality(ctx: dict, progress: bool) -> dict:
    from . import quality

    q = ctx["quality"]
    start = time.perf_counter()
    scores = quality.evaluate(ctx["model"], q["reference"], ctx["device"], progress)
    return {**scores, "corpus": q["corpus"].name, "corpus_sha256": q["corpus"].sha256, "window": q["key"]["window"],
            "windows": q["key"]["windows"], "kl_top_k": q["key"]["top_k"], "reference_cache": str(q["path"]),
            "reference_cached": q["cached"], "eval_s": time.perf_counter() - start}


def variant_label(kind: str, plan: dict, settings, compiled: bool) -> str:
    """original / the plan's label, with the executor when it is not bitsandbytes and +compile when compiled."""
    label = "original" if kind == "original" else plan_label(plan)
    if kind == "ewq" and settings.backend != "bitsandbytes":
        label += f"@{settings.backend}" + ("-a8" if settings.int8_activations else "")
    return label + ("+compile" if compiled else "")


def run(kind: str, argv=None) -> Path:
    from . import bench

    args = build_parser(kind).parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 2:
        raise EWQError(f"--max-new-tokens must be at least 2 (a first token and one decoded), got {args.max_new_tokens}")
    if args.repeats < 1:
        raise EWQError(f"--repeats must be at least 1, got {args.repeats}")
    if kind == "ewq" and not (math.isfinite(args.int8_threshold) and args.int8_threshold >= 0):
        raise EWQError(f"--int8-threshold must be a finite number >= 0, got {args.int8_threshold}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    suite = bench.load_suite(tasks)
    out_dir = check_writable_dir(args.out_dir)

    if args.compile:
        bench.check_compiler(pick_device(args.device))
    ctx = prepare(args, kind)
    device, plan = ctx["device"], ctx["plan"]
    if ctx["ckpt"].kind == "encoder":
        measured = measure_encoder(args, ctx)
    else:
        measured = measure_decoder(args, ctx, suite)
    by_precision = weight_bytes_by_precision(ctx["model"], plan)
    weight_bytes = sum(by_precision.values())
    block_bytes = by_precision["raw"] + by_precision["8-bit"] + by_precision["4-bit"]
    block_params = plan["size"]["block_params"]
    tests, warmup_s = measured["tests"], measured["warmup_s"]
    result = {
        "schema_version": bench.RESULT_SCHEMA_VERSION,
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
        "environment": bench.environment(device, ctx["dtype"], ctx["settings"], args.compile),
        "settings": measured["settings"],
        "load": {"path_taken": ctx["path_taken"], "load_s": ctx["load_s"], "quantize_s": ctx["quantize_s"],
                 "saved_to": ctx["saved_to"], "kept_raw": ctx["kept_raw"],
                 "warmup_s": warmup_s, "compile_warmup_s": warmup_s if args.compile else None},
        "memory": {
            "weight_bytes": weight_bytes, "weight_gb": weight_bytes / 1e9, "weight_bytes_by_precision": by_precision,
            "block_avg_bits_per_weight": 8 * block_bytes / block_params,
            "peak_allocated_gb": measured["peak_gb"],
            "peak_source": "torch.cuda.max_memory_allocated" if device != "cpu" else
            f"process peak RSS (VmHWM) during the {'encoder benchmark' if measured.get('encoder') else 'suite'}",
            "driver_process_gb": bench.driver_process_gb(device),
        },
        "speed": bench.speed_summary(tests, weight_bytes, bench.read_bandwidth_gb_s(device, progress=not args.no_progress))
        if tests else None,  # decoders: generation; encoders measure sentences/s in `encoder`
        "tests": tests,
        "quality": measured["quality"],
        "encoder": measured.get("encoder"),
    }
    if args.compile:
        result["speed"]["compiled_matches_eager"] = all(t["same_tokens_as_eager"] for t in tests)
    name_hash = plan_hash(plan) if kind == "ewq" else ctx["fingerprint"][:12]
    path = bench.write_result(result, out_dir, name_hash)
    print(bench.format_table(result))
    return path


def measure_decoder(args, ctx: dict, suite: list) -> dict:
    """The generation suite (speed, memory) and, with --quality, KL and perplexity on text windows."""
    from . import bench

    device = ctx["device"]
    cpu = device == "cpu"
    new_tokens = args.max_new_tokens or (bench.CPU_DEFAULT_NEW_TOKENS if cpu else bench.CUDA_DEFAULT_NEW_TOKENS)
    if cpu and args.max_new_tokens is None:
        print(f"note: on the CPU the suite decodes {new_tokens} tokens per prompt by default (--max-new-tokens to change)")
    try:
        tests, warmup_s = bench.run_suite(ctx["model"], ctx["tokenizer"], suite, new_tokens, args.repeats, device,
                                          progress=not args.no_progress, compile=args.compile)
    except torch.cuda.OutOfMemoryError:
        raise EWQError(f"out of GPU memory during generation ({torch.cuda.max_memory_allocated() / 1e9:.2f} GB "
                       f"allocated at peak); lower --max-new-tokens or choose a smaller plan") from None
    quality = measure_quality(ctx, not args.no_progress) if args.quality else None
    settings = {"max_new_tokens": new_tokens, "repeats": args.repeats, "tasks": sorted({t["task"] for t in suite}),
                "prompts": len(suite), "warmup_tokens": new_tokens if args.compile else min(bench.WARMUP_TOKENS, new_tokens),
                "greedy": True, "compile": args.compile,
                "cache": "static (one size for the suite)" if args.compile else "dynamic"}
    return {"tests": tests, "warmup_s": warmup_s, "quality": quality, "settings": settings,
            "peak_gb": max(t["peak_memory_gb"] for t in tests)}


def measure_encoder(args, ctx: dict) -> dict:
    """Sentences/s at batch 1 and 32, batch-1 latency, and (for a quantized model) fidelity to the original's
    embeddings of the evaluation sentences."""
    from . import embed

    q, device = ctx["quality"], ctx["device"]
    speed_sentences = q["sentences"][:args.speed_sentences or embed.SPEED_SENTENCES]
    start = time.perf_counter()
    embedder = q["embedder"]
    encoder = embed.encoder_suite(ctx["model"], embedder, speed_sentences, args.repeats, device,
                                  progress=not args.no_progress)
    quality = None
    if ctx["path_taken"] != "original-checkpoint":
        t0 = time.perf_counter()
        variant = embedder.embed(ctx["model"], q["sentences"], device, progress=not args.no_progress, desc="fidelity")
        quality = {**embed.fidelity(q["reference"]["embeddings"], variant), "corpus": q["corpus"].name,
                   "corpus_sha256": q["corpus"].sha256, "reference_cache": str(q["path"]),
                   "reference_cached": q["cached"], "eval_s": time.perf_counter() - t0}
    peak = encoder.pop("peak_memory_gb")
    encoder.update(pooling=embedder.pooling.mode, normalize=embedder.pooling.normalize,
                   pooling_source=embedder.pooling.source, max_length=embedder.max_length,
                   truncated_sentences=len(q["truncated"]),
                   bench_s=time.perf_counter() - start)
    settings = {"repeats": args.repeats, "speed_sentences": len(speed_sentences), "eval_sentences": len(q["sentences"]),
                "batch_sizes": list(embed.BATCH_SIZES), "warmup": "one untimed pass at each batch size",
                "order": "corpus order, each batch padded to its longest sentence"}
    return {"tests": [], "warmup_s": None, "quality": quality, "settings": settings, "peak_gb": peak,
            "encoder": encoder}


def fidelity_inputs(args, path: Path, config: dict, tokenizer, fingerprint: str, dtype, device: str) -> dict:
    """Evaluation sentences, the model's pooling and (if cached) the original's embeddings of them."""
    from . import embed, quality

    corpus = quality.load_corpus(args.eval_text)
    sentences = embed.corpus_sentences(corpus, args.eval_sentences or embed.EVAL_SENTENCES)
    embedder = embed.Embedder.of(path, config, tokenizer)
    limit = embedder.max_length
    cut = embedder.truncated(sentences)
    if cut:
        print(f"note: {len(cut)} of {len(sentences)} sentences are longer than the model's {limit} tokens and are "
              f"embedded from their first {limit} tokens")
    key = {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256,
           "sentences": len(sentences), "sentences_sha256": embed.sentences_digest(sentences),
           "pooling": embedder.pooling.mode, "normalize": embedder.pooling.normalize, "max_length": limit,
           "dtype": str(dtype).replace("torch.", ""), "device_type": device.split(":")[0], "kind": "embeddings"}
    cache = quality.cache_path(Path(args.out_dir) / ".reference", key)
    reference = quality.load_reference(cache, key, names={"embeddings"})
    return {"corpus": corpus, "sentences": sentences, "embedder": embedder, "truncated": cut,
            "key": key, "path": cache, "reference": reference, "cached": reference is not None}


def embedding_reference(model, q: dict, device: str, progress: bool) -> dict:
    from . import quality

    if device != "cpu":
        model.to(device)
    reference = {"embeddings": q["embedder"].embed(model, q["sentences"], device, progress=progress,
                                                   desc="reference embeddings")}
    if device != "cpu":
        model.to("cpu")
    quality.save_reference(q["path"], q["key"], reference)
    return reference
