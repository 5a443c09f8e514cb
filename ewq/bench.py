"""Stage 5: the benchmark suite, timed like for like, with exact memory figures.

Both scripts run this one module; they differ only in whether a plan is applied.
Timing: one warm-up generation first; greedy decoding; exactly --max-new-tokens new tokens every time
(min_new_tokens = max_new_tokens, so EOS cannot stop a run early); --repeats runs per prompt with
median, min and max; prefill (time to the first new token) is split from decode tokens/s; the device
is synchronised around every timed region.
Memory: weight bytes counted from the tensors; peak allocated during generation (CUDA:
max_memory_allocated after reset_peak_memory_stats; CPU: the process's peak RSS, VmHWM, reset before
the suite); on CUDA also what the driver reports for this process (NVML).
"""

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .common import EWQError, unique_path, write_json_atomic

RESULT_SCHEMA_VERSION = 1
CPU_DEFAULT_NEW_TOKENS, CUDA_DEFAULT_NEW_TOKENS = 32, 128
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

def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


# ---- memory ----

def reset_peak_memory(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # give freed heap (e.g. the float weights replaced by quantized ones) back to the OS first
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def driver_process_gb(device: str):
    """GPU memory the driver attributes to this process (what nvidia-smi shows), or None on the CPU."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return proc.usedGpuMemory / 1e9
    except Exception:
        pass
    free, total = torch.cuda.mem_get_info()  # fallback: everything in use on the device
    return (total - free) / 1e9


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


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


# ---- the roofline: how fast this device can read memory ----

def cache_dir() -> Path:
    """Per-machine facts (the device's bandwidth): $EWQ_CACHE, else ~/.cache/ewq."""
    return Path(os.environ.get("EWQ_CACHE") or Path.home() / ".cache" / "ewq")


def read_bandwidth_gb_s(device: str, progress: bool = True) -> float:
    """The device's memory read bandwidth: torch.sum over a buffer far larger than any cache (1 GiB on the CPU,
    4 GiB on a GPU), median of 5 after a warm-up. Measured once per device and thread count, then cached."""
    import hashlib

    name = device_name(device)
    path = cache_dir() / f"bandwidth_{hashlib.sha256(name.encode()).hexdigest()[:12]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached["device_name"] == name and cached["threads"] == torch.get_num_threads():
            return cached["read_bandwidth_gb_s"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if progress:
        print(f"measuring the memory read bandwidth of {name} (once; cached in {path.parent})", flush=True)
    nbytes = (4 if device.startswith("cuda") else 1) << 30
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        buf.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    del buf
    gb_s = nbytes / statistics.median(times[1:]) / 1e9
    write_json_atomic(path, {"device_name": name, "threads": torch.get_num_threads(), "read_bandwidth_gb_s": gb_s,
                             "method": f"torch.sum over {nbytes >> 30} GiB of float32, median of 5",
                             "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return gb_s


def environment(device: str, dtype: torch.dtype, settings, compiled: bool = False) -> dict:
    import importlib.metadata

    import transformers

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    from .backends import get_backend

    return {
        "device": device, "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": version("bitsandbytes"), "torchao": version("torchao"), "python": platform.python_version(),
        "ewq": __version__, "backend": settings.backend, "quant_type": settings.quant_type,
        "double_quant": settings.double_quant, "int8_threshold": settings.threshold, "group_size": settings.group_size,
        "formats": get_backend(settings.backend).formats(settings), "compiled": compiled,
    }


def format_table(result: dict) -> str:
    if result.get("encoder"):
        from .embed import format_result

        return format_result(result)
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


def write_result(result: dict, out_dir, name_hash: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = unique_path(out_dir, f"{result['kind']}_benchmark_{name_hash}_{stamp}", ".json")
    return write_json_atomic(path, result)
