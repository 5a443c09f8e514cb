"""Where a model runs and in which dtype, by default: one answer for the benchmarks, the plans' size estimates
(a raw weight costs the bits of this dtype) and the service."""

import torch

from .common import EWQError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise EWQError(f"--device cuda, but CUDA is not available to torch {torch.__version__}; use --device cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def pick_dtype(choice, device: str, backend: str, kind: str = "decoder") -> torch.dtype:
    if choice:
        return DTYPES[choice]
    if backend == "torch-dynamic":
        return torch.float32  # torch's dynamic int8 kernels take fp32 activations
    if backend == "torchao" and device == "cuda":
        return torch.bfloat16  # torchao's CUDA int4 kernel (tinygemm) takes bf16 only
    if kind == "encoder" and device == "cpu":
        # an encoder is compute-bound (whole sentences at once, no weight-reading decode loop): without native
        # bf16 matmul on this CPU bf16 ran at 0.17x fp32 (DESIGN.md), so encoders keep their fp32 here
        return torch.float32
    # CPU, measured on this project's 2-core AVX2 machine (bench/cpu_dtype.py, docs/RESULTS.md): bf16
    # decodes 1.6x faster than fp32 (20.6 vs 12.7 tok/s: decode reads every weight, bf16 reads half) but
    # prefills 3.6x slower (no native bf16 matmul). Decode is the headline figure and bf16 keeps raw
    # blocks at 16 bits as fp16 does on a GPU, so bf16 is the CPU default.
    return torch.float16 if device == "cuda" else torch.bfloat16
