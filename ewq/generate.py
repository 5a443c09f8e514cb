"""Stage 5 for decoders: the generation suite, timed like for like, and quality on text windows.

The runner (runner.py) calls this module for a decoder; encoders have their own (embed.py), with the same
small interface: add_arguments, check_arguments, quality_inputs, make_reference, measure, format_result.
Timing: one warm-up generation first; greedy decoding; exactly --max-new-tokens new tokens every time
(min_new_tokens = max_new_tokens, so EOS cannot stop a run early); --repeats runs per prompt with
median, min and max; prefill (time to the first new token) is split from decode tokens/s; the device
is synchronised around every timed region. Memory: peak allocated during generation (probes.py).
Quality (--quality): perplexity, KL(original || this) and top-1 agreement on fixed windows of real text
against the original's reference log-probs (quality.py), computed once from the float model and cached.
"""

import json
import os
import statistics
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from . import quality
from .common import EWQError
from .probes import peak_memory_gb, read_bandwidth_gb_s, reset_peak_memory, synchronize

KIND = "decoder"
CPU_DEFAULT_NEW_TOKENS, CUDA_DEFAULT_NEW_TOKENS = 32, 128
CPU_EVAL_TOKENS, CUDA_EVAL_TOKENS = 4096, 16384
WARMUP_TOKENS = 8


# ---- the suite ----

def load_suite(tasks=None) -> list:
    data = json.loads(resources.files("ewq").joinpath("prompts.json").read_text(encoding="utf-8"))["tasks"]
    if tasks:
        unknown = [t for t in tasks if t not in data]
        if unknown:
            raise EWQError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(data)}")
    return [{"task": t, **p} for t, prompts in data.items() if not tasks or t in tasks for p in prompts]


def task_names() -> list:
    return [t for t in dict.fromkeys(x["task"] for x in load_suite())]


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


# ---- timing ----

class _FirstTokenClock:
    """A generate() streamer that notes when the first new token exists (generate passes the prompt first)."""

    def __init__(self, device):
        self.device, self.calls, self.first = device, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            synchronize(self.device)
            self.first = time.perf_counter()

    def end(self):
        pass


def generate_exact(model, input_ids: torch.Tensor, new_tokens: int, device: str, clock: bool = True):
    """Greedy generation of exactly `new_tokens` tokens. Returns (prefill_s, decode_s, new token ids)."""
    streamer = _FirstTokenClock(device) if clock else None
    input_ids = input_ids.to(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             num_beams=1, streamer=streamer, pad_token_id=model.generation_config.eos_token_id
                             if model.generation_config.pad_token_id is None else model.generation_config.pad_token_id)
    synchronize(device)
    end = time.perf_counter()
    ids = out[0, input_ids.shape[1]:].tolist()
    if not clock:
        return None, None, ids
    return streamer.first - start, end - streamer.first, ids


# ---- compiled decoding ----

def check_compiler(device: str) -> None:
    """torch.compile's inductor builds C++ on the CPU and Triton kernels on CUDA: refuse early without them."""
    import importlib.util
    import shutil

    if device == "cpu":
        if not any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++"))):
            raise EWQError("--compile needs a C++ compiler on the CPU (torch.compile builds C++ kernels); install one "
                           "(e.g. apt-get install g++) or drop --compile")
    elif importlib.util.find_spec("triton") is None:
        raise EWQError("--compile on CUDA needs the triton package (torch.compile builds Triton kernels); "
                       "pip install triton, or drop --compile")


def use_compiled_decoding(model, device: str, max_cache_len: int) -> None:
    """transformers' compiled generate: a static KV cache of one size for the whole suite (so the decode step
    has one shape and compiles once) and torch.compile of the forward for the decode steps; prefill stays eager."""
    from transformers import CompileConfig

    config = model.generation_config
    config.cache_implementation = "static"
    config.max_cache_len = max_cache_len
    compile_config = CompileConfig(mode="reduce-overhead" if device.startswith("cuda") else "default")
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless asked
    config.compile_config = compile_config


def use_eager_decoding(model) -> None:
    model.generation_config.cache_implementation = None
    model.generation_config.compile_config = None


# ---- the suite run ----

def run_suite(model, tokenizer, suite, max_new_tokens: int, repeats: int, device: str, progress: bool = True,
              compile: bool = False) -> tuple:
    """(per-prompt results, warm-up seconds). With `compile`, the warm-up generates a whole run (that is when
    torch.compile compiles) and every prompt is also generated once eagerly to compare the tokens."""
    prompts = [encode_prompt(tokenizer, item["prompt"]) for item in suite]
    eager_tokens = None
    if compile:
        eager_tokens = [generate_exact(model, ids, max_new_tokens, device, clock=False)[2] for ids in prompts]
        use_compiled_decoding(model, device, max(ids.shape[1] for ids in prompts) + max_new_tokens + 1)
    start = time.perf_counter()
    generate_exact(model, prompts[0], max_new_tokens if compile else min(WARMUP_TOKENS, max_new_tokens), device,
                   clock=False)  # warm-up: kernels, caches, allocator (and compilation)
    if compile and len(prompts) > 1:
        generate_exact(model, prompts[-1], 2, device, clock=False)  # a second prompt length: any recompile happens here
    warmup_s = time.perf_counter() - start
    tests = []
    for n, item in enumerate(tqdm(suite, desc="benchmark", disable=not progress, leave=False)):
        ids = prompts[n]
        reset_peak_memory(device)
        runs = [generate_exact(model, ids, max_new_tokens, device) for _ in range(repeats)]
        prefill = [r[0] for r in runs]
        decode = [(max_new_tokens - 1) / r[1] for r in runs]
        tokens = runs[0][2]
        tests.append({
            "task": item["task"], "lang": item["lang"], "prompt": item["prompt"], "prompt_tokens": ids.shape[1],
            "new_tokens": len(tokens), "prefill_s": statistics.median(prefill), "prefill_s_min": min(prefill),
            "prefill_s_max": max(prefill), "decode_tok_s": statistics.median(decode), "decode_tok_s_min": min(decode),
            "decode_tok_s_max": max(decode), "peak_memory_gb": peak_memory_gb(device),
            "text": tokenizer.decode(tokens, skip_special_tokens=True), "token_ids": tokens,
            # GPU kernels may be non-deterministic; the timing stays like for like (same token count) either way
            "same_tokens_every_repeat": all(r[2] == tokens for r in runs),
        })
        if eager_tokens is not None:
            tests[-1]["same_tokens_as_eager"] = eager_tokens[n] == tokens
            tests[-1]["eager_token_ids"] = eager_tokens[n]
    if compile:
        use_eager_decoding(model)
    return tests, warmup_s


def speed_summary(tests: list, weight_bytes: int, device_bandwidth_gb_s: float | None = None) -> dict:
    decode = statistics.median(t["decode_tok_s"] for t in tests)
    achieved = weight_bytes * decode / 1e9  # every weight byte is read once per decoded token (embedding rows aside)
    return {
        "prefill_s_median": statistics.median(t["prefill_s"] for t in tests),
        "decode_tok_s_median": decode,
        "decode_tok_s_min": min(t["decode_tok_s_min"] for t in tests),
        "decode_tok_s_max": max(t["decode_tok_s_max"] for t in tests),
        "bandwidth_gb_s": achieved,
        "device_read_bandwidth_gb_s": device_bandwidth_gb_s,
        "bandwidth_fraction": achieved / device_bandwidth_gb_s if device_bandwidth_gb_s else None,
        "roofline_tok_s": device_bandwidth_gb_s * 1e9 / weight_bytes if device_bandwidth_gb_s else None,
    }


def format_result(result: dict) -> str:
    """The per-prompt table and the summary lines a decoder's benchmark prints."""
    lines = [f"{'task':<22} {'lang':<4} {'prefill s':>9} {'decode tok/s':>12} {'peak GB':>8}"]
    for t in result["tests"]:
        lines.append(f"{t['task']:<22} {t['lang']:<4} {t['prefill_s']:>9.3f} {t['decode_tok_s']:>12.2f} "
                     f"{t['peak_memory_gb']:>8.3f}")
    s, m = result["speed"], result["memory"]
    lines.append(f"{result['variant']}: decode {s['decode_tok_s_median']:.2f} tok/s (min {s['decode_tok_s_min']:.2f}, "
                 f"max {s['decode_tok_s_max']:.2f}), prefill {s['prefill_s_median']:.3f} s, weights "
                 f"{m['weight_gb']:.3f} GB, peak {m['peak_allocated_gb']:.3f} GB ({m['peak_source']}), "
                 f"{s['bandwidth_gb_s']:.2f} GB/s on {result['environment']['device_name']}"
                 + (f" = {100 * s['bandwidth_fraction']:.0f}% of its measured {s['device_read_bandwidth_gb_s']:.1f} GB/s "
                    f"read bandwidth (roofline {s['roofline_tok_s']:.1f} tok/s)" if s.get("bandwidth_fraction") else ""))
    q = result.get("quality")
    if q:
        lines.append(f"quality: perplexity {q['perplexity']:.3f}, KL {q['kl_mean']:.5f}, top-1 agreement "
                     f"{q['top1_agreement']:.4f} over {q['eval_tokens']} tokens of {q['corpus']}"
                     f"{' (reference from cache)' if q['reference_cached'] else ''}")
    return "\n".join(lines)


# ---- the decoder's part of a benchmark run (runner.py calls these) ----

MISSING_REFERENCE = "no cached reference of the base model for these windows; run `python benchmark_original.py " \
                    "--quality --model {base}` with the same --eval-* settings first"


def add_arguments(p) -> None:
    """The flags only decoders take; an encoder refuses them (runner.check_kind_flags)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                      help="static KV cache + torch.compile of the decode step (transformers' compiled generate); the "
                           "compile and warm-up time is reported apart from decode tok/s (seconds to minutes on a "
                           "2-core CPU). Backends that do not compile (bitsandbytes, torch-dynamic) are refused with "
                           "the reason. Default: the mode the executor probe chose on this machine (see --backend)")
    mode.add_argument("--eager", dest="compile", action="store_const", const=False,
                      help="run eagerly, as transformers does by default (the published proof of concept's way)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"exactly this many new tokens per prompt, EOS ignored (default {CUDA_DEFAULT_NEW_TOKENS} on cuda, "
                        f"{CPU_DEFAULT_NEW_TOKENS} on cpu)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of: {', '.join(task_names())} (default all)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help=f"tokens scored by --quality (default {CPU_EVAL_TOKENS} on cpu, {CUDA_EVAL_TOKENS} on cuda)")
    p.add_argument("--eval-window", type=int, default=quality.WINDOW,
                   help=f"tokens per non-overlapping window (default {quality.WINDOW})")
    p.add_argument("--kl-top-k", type=int, default=quality.TOP_K,
                   help=f"the original's top-k log-probs kept for KL; the rest is pooled into one bucket "
                        f"(default {quality.TOP_K})")


def suite_of(args) -> list:
    """The prompts --tasks asks for (all by default); unknown task names are refused."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    return load_suite(tasks)


def check_arguments(args) -> None:
    """Values of the decoder flags, checked before any weight is read."""
    if args.max_new_tokens is not None and args.max_new_tokens < 2:
        raise EWQError(f"--max-new-tokens must be at least 2 (a first token and one decoded), got {args.max_new_tokens}")
    suite_of(args)


def quality_inputs(args, path: Path, config: dict, tokenizer, fingerprint: str, dtype, device: str):
    """With --quality: corpus, windows and (if cached) the original's reference, checked before any model is loaded."""
    if not args.quality:
        return None
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


def make_reference(model, q: dict, device: str, progress: bool) -> dict:
    """The original's top-k log-probs on the windows, from the float model, saved to the reference cache."""
    if device != "cpu":
        model.to(device)
    reference = quality.compute_reference(model, q["windows"], device, q["key"]["top_k"], progress)
    if device != "cpu":
        model.to("cpu")  # quantization happens on the CPU, as for every run
    quality.save_reference(q["path"], q["key"], reference)
    return reference


def measure_quality(ctx: dict, progress: bool) -> dict:
    q = ctx["quality"]
    start = time.perf_counter()
    scores = quality.evaluate(ctx["model"], q["reference"], ctx["device"], progress)
    return {**scores, "corpus": q["corpus"].name, "corpus_sha256": q["corpus"].sha256, "window": q["key"]["window"],
            "windows": q["key"]["windows"], "kl_top_k": q["key"]["top_k"], "reference_cache": str(q["path"]),
            "reference_cached": q["cached"], "eval_s": time.perf_counter() - start}


def measure(args, ctx: dict, weight_bytes: int) -> dict:
    """The generation suite (speed, memory) and, with --quality, KL and perplexity on text windows."""
    device = ctx["device"]
    suite = suite_of(args)
    cpu = device == "cpu"
    new_tokens = args.max_new_tokens or (CPU_DEFAULT_NEW_TOKENS if cpu else CUDA_DEFAULT_NEW_TOKENS)
    if cpu and args.max_new_tokens is None:
        print(f"note: on the CPU the suite decodes {new_tokens} tokens per prompt by default (--max-new-tokens to change)")
    try:
        tests, warmup_s = run_suite(ctx["model"], ctx["tokenizer"], suite, new_tokens, args.repeats, device,
                                    progress=not args.no_progress, compile=args.compile)
    except torch.cuda.OutOfMemoryError:
        raise EWQError(f"out of GPU memory during generation ({torch.cuda.max_memory_allocated() / 1e9:.2f} GB "
                       f"allocated at peak); lower --max-new-tokens or choose a smaller plan") from None
    measured_quality = measure_quality(ctx, not args.no_progress) if args.quality else None
    settings = {"max_new_tokens": new_tokens, "repeats": args.repeats, "tasks": sorted({t["task"] for t in suite}),
                "prompts": len(suite), "warmup_tokens": new_tokens if args.compile else min(WARMUP_TOKENS, new_tokens),
                "greedy": True, "compile": args.compile,
                "cache": "static (one size for the suite)" if args.compile else "dynamic"}
    speed = speed_summary(tests, weight_bytes, read_bandwidth_gb_s(device, progress=not args.no_progress))
    if args.compile:
        speed["compiled_matches_eager"] = all(t["same_tokens_as_eager"] for t in tests)
    return {"tests": tests, "warmup_s": warmup_s, "quality": measured_quality, "settings": settings,
            "peak_gb": max(t["peak_memory_gb"] for t in tests), "peak_during": "suite", "speed": speed}
