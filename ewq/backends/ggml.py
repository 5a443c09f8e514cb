"""llama.cpp (ggml) formats as a backend of the torch pipeline: its quantizers emulated bit for bit in torch
(ewq.ggml_quants), so sensitivity sweeps and plan checks measure what llama.cpp's files will hold.

A plan for this executor names ggml types (Q8_0, Q6_K, Q5_K, Q4_K, Q5_0, Q4_0, ...); a torch-menu plan's
8-bit and 4-bit run as Q8_0 and Q4_0 (the closest formats: symmetric, blocks of 32). Layers here are
"fake-quantized": an nn.Linear whose weight is the format's round trip, in the run dtype. The file itself is
written by ewq.export and run by llama.cpp (ewq/backends/llamacpp.py's LlamaCppModel).
"""

import torch

from ..common import EWQError
from . import as_linear

# the sweep's menu: Q4_1/Q5_1 (float minimum per 32) are left out by default: they re-find the grid of a checkpoint
# that went through GGUF Q4_1 (the embedded SmolLM2 did) and would look falsely lossless there
PRECISIONS = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "Q4_0")
TORCH_MENU_AS = {"8-bit": "Q8_0", "4-bit": "Q4_0"}
COMPILES = False
COMPILE_NOTE = "llama.cpp runs its own kernels; nothing to compile in torch"
SAVE_METHOD = None


def ggml_type(precision: str) -> str:
    return TORCH_MENU_AS.get(precision, precision)


def check(settings, dtype, device: str) -> None:
    if device != "cpu":
        raise EWQError("the llama.cpp emulation runs on the CPU here; pass --device cpu")


def cannot_save(precisions, device: str):
    return "a llama.cpp plan is saved as a GGUF file: python -m ewq.export gguf --plan PLAN --model M --out OUT.gguf"


def unsupported(shape, precision: str, settings):
    from ..ggml_quants import can_quantize

    if not can_quantize(tuple(shape), ggml_type(precision)):
        return f"rows of {shape[1]} are not whole {ggml_type(precision)} blocks"
    return None


def round_trip(weight: torch.Tensor, precision: str, settings=None) -> torch.Tensor:
    """The weight after one trip through the ggml format (float32), exactly as llama-quantize writes it."""
    from ..ggml_quants import quantize_dequantize

    return quantize_dequantize(weight.detach().float().cpu(), ggml_type(precision))


def quantize_layer(module, precision: str, settings, dtype, device: str = "cpu"):
    lin = as_linear(module, torch.float32, "cpu")
    lin.weight.data = round_trip(lin.weight.data, precision).to(dtype)
    if lin.bias is not None:
        lin.bias.data = lin.bias.data.to(dtype)
    return lin.to(device)


def state_bytes(module) -> int:
    return 0


def dequantize(module):
    return module.weight.float()  # the layer holds the format's round trip already


LAYER_DTYPE = torch.float32  # the emulation is exact in float32; rounding it to bf16 would add its own error


def formats(settings) -> dict:
    return {"menu": list(PRECISIONS), "8-bit": "Q8_0", "4-bit": "Q4_0",
            "emulation": "ewq.ggml_quants: ggml's reference quantizers (no importance matrix), bit-exact on x86-64"}
