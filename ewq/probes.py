"""Measurement probes both model kinds use: device sync, peak memory, the device's name and instruction set,
its memory read bandwidth (the roofline), and the environment block of every result.

Memory: on CUDA max_memory_allocated after reset_peak_memory_stats, and what the driver reports for this
process (NVML); on the CPU the process's peak RSS (VmHWM), reset before each measured region.
"""

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from . import __version__
from .backends import get_backend
from .common import write_json_atomic


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()



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


def cpu_info() -> tuple:
    """(model name or None, set of flags) of the first CPU in /proc/cpuinfo; (None, empty) where there is none."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
            if name and flags:
                break
    except OSError:
        pass
    return name, flags


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name = cpu_info()[0]
    return f"{name} ({os.cpu_count()} cores)" if name else platform.processor() or "cpu"


# ---- the roofline: how fast this device can read memory ----

def cache_dir() -> Path:
    """Per-machine facts (the device's bandwidth): $EWQ_CACHE, else ~/.cache/ewq."""
    return Path(os.environ.get("EWQ_CACHE") or Path.home() / ".cache" / "ewq")


def busy_cores(device: str) -> float:
    """Cores other processes keep busy now (1-minute load average beyond this process's own core), on the CPU. With
    torch's threads spread over every core, one busy core slows each parallel region to the slowest thread: measured
    here, a 3.4 ms layer stack took 430 ms while a test run used the other core. A probe timed then misranks."""
    if device != "cpu":
        return 0.0
    try:
        return max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        return 0.0


def bandwidth_key(device: str) -> dict:
    """What the read bandwidth depends on: the device and, on the CPU, the threads summing the buffer."""
    return {"device_name": device_name(device), "threads": torch.get_num_threads()}


def bandwidth_cache_path(device: str) -> Path:
    """One file per bandwidth_key: runs with different thread counts keep their own measurement."""
    import hashlib

    key = bandwidth_key(device)
    return cache_dir() / f"bandwidth_{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.json"


def read_bandwidth_gb_s(device: str, progress: bool = True) -> float:
    """The device's memory read bandwidth: torch.sum over a buffer far larger than any cache (1 GiB on the CPU,
    4 GiB on a GPU), median of 5 after a warm-up. Measured once per device and thread count, then cached."""
    key = bandwidth_key(device)
    name, path = key["device_name"], bandwidth_cache_path(device)
    try:
        cached = json.loads(path.read_text())
        if all(cached[k] == v for k, v in key.items()) and not (
                cached.get("busy_cores", 0) >= 0.5 and busy_cores(device) < 0.5):  # (busy then, quiet now: again)
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
    write_json_atomic(path, {**key, "read_bandwidth_gb_s": gb_s,
                             "busy_cores": busy_cores(device),
                             "method": f"torch.sum over {nbytes >> 30} GiB of float32, median of 5",
                             "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return gb_s


# CPU flags the executors' kernels depend on (torch's own dispatch level is recorded beside them)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16")


def instruction_set(device: str) -> dict:
    """What the kernels of this device can use: on the CPU the flags above (from /proc/cpuinfo) and the level torch
    dispatches at (torch.backends.cpu.get_cpu_capability: DEFAULT / AVX2 / AVX512); on CUDA the compute capability.
    The same plan's speed-up differs between an AVX2 and an AVX-512 machine, so every speed figure carries this."""
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability()
        return {"cuda_compute_capability": f"{major}.{minor}"}
    flags = cpu_info()[1]
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def format_instruction_set(isa: dict | None) -> str:
    """'AVX512: avx2 avx512f avx512_vnni avx512_bf16' or 'sm 9.0' for the report and the scripts' lines."""
    if not isa:
        return "instruction set not recorded"
    if "cuda_compute_capability" in isa:
        return f"compute capability {isa['cuda_compute_capability']}"
    return f"torch {isa.get('torch_cpu_capability')} kernels; " + (" ".join(isa.get("flags") or []) or "no AVX2")


def environment(device: str, dtype: torch.dtype, settings, compiled: bool = False) -> dict:
    import importlib.metadata

    import transformers

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "device": device, "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": version("bitsandbytes"), "torchao": version("torchao"),
        "llama_cpp_python": version("llama-cpp-python"), "python": platform.python_version(),
        "ewq": __version__, "backend": settings.backend, "quant_type": settings.quant_type,
        "double_quant": settings.double_quant, "int8_threshold": settings.threshold, "group_size": settings.group_size,
        "formats": get_backend(settings.backend).formats(settings), "compiled": compiled,
        "instruction_set": instruction_set(device),
        # written after the measurements: the last minute's load includes this run's own threads
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "cpu_count": os.cpu_count(),
    }


def competed(env: dict) -> str | None:
    """A warning when other processes competed for the CPU during a run (load beyond this run's own threads), else
    None: with torch's threads on every core, one busy core can slow a run many times over."""
    load, cores, threads = env.get("load_average_1m"), env.get("cpu_count"), env.get("threads") or 1
    if env.get("device") != "cpu" or load is None or not cores or load <= min(cores, threads) + 0.75:
        return None
    return (f"warning: the load average was {load:.1f} on {cores} CPUs during this run (this run's own threads: "
            f"{threads}): other processes competed, so its speeds are low and noisy; measure again on a quiet machine")
