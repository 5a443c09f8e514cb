"""torch's dynamic int8 post-training quantization (torch.ao.quantization.quantize_dynamic), the user's
existing CPU method: int8 weights with one per-tensor scale, activations quantized per call, fp32 only."""

import warnings

import torch
from torch import nn

from ..common import EWQError
from . import as_linear

PRECISIONS = ("8-bit",)
COMPILES = False
COMPILE_NOTE = ("torch's dynamic int8 modules keep packed parameters (a TorchScript object) that torch.compile "
                "cannot trace; they run eager")
SAVE_METHOD = "dynamic-ptq-int8"


def check(settings, dtype, device: str) -> None:
    if device != "cpu":
        raise EWQError("the torch-dynamic backend runs on the CPU only; pass --device cpu")
    if dtype != torch.float32:
        raise EWQError("the torch-dynamic backend runs in float32 only; pass --dtype float32")


def cannot_save(precisions, device: str):
    return None


def unsupported(shape, precision: str, settings):
    return None


def quantize_layer(module, precision: str, settings, dtype, device: str = "cpu"):
    if precision != "8-bit":
        raise EWQError(f"the torch-dynamic backend has no {precision}; use --backend torchao or bitsandbytes")
    wrapper = nn.Sequential(as_linear(module, torch.float32))  # quantize_dynamic swaps children, not the root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated but still works in 2.13
        torch.ao.quantization.quantize_dynamic(wrapper, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return wrapper[0]


def state_bytes(module) -> int:
    packed = getattr(module, "_packed_params", None)
    if packed is None or not hasattr(packed, "_weight_bias"):
        return 0
    w, b = packed._weight_bias()
    scales = 16 if w.qscheme() == torch.per_tensor_affine else 16 * w.q_per_channel_scales().numel()
    return w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size()) + scales


def formats(settings) -> dict:
    return {"8-bit": "dynamic int8 (per-tensor weight scale, activations quantized per call)"}


def dequantize(module):
    return None  # activations are quantized per call: the fast sweep runs the layer itself
