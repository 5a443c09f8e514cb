"""Executors: one module per backend, all behind the same small interface.

Every backend module provides
    PRECISIONS                 the plan precisions it can run ("8-bit", "4-bit")
    COMPILES, COMPILE_NOTE     whether `--compile` (static cache + torch.compile) works with it, and why not
    SAVE_METHOD                the `method` written to a saved model's metadata.json
    cannot_save(precisions, device)           why a model with these plan precisions cannot be saved, or None
    check(settings, dtype, device)            refuse combinations it cannot run (EWQError, one line)
    unsupported(shape, precision, settings)   why its kernel cannot take a matrix of shape [out, in], or None
    quantize_layer(layer, precision, settings, dtype, device) -> a new module; the float layer is left untouched
    state_bytes(module)        bytes a quantized layer keeps outside its registered parameters
    dequantize(module)         the float weight a quantized layer computes with, or None if it also quantizes its
                               activations (the fast sensitivity sweep uses it)
    formats(settings)          what "8-bit" and "4-bit" mean with these settings, for result JSONs
and optionally
    round_input(x, precision)  the input as the layer's kernel rounds it before the product, for the fast sweep's
                               weight-only path (llama.cpp: ggml's Q8_0/Q8_K activations); absent: not rounded
and (torch-dynamic has them)
    key(settings)              its options that change the numbers, for QuantSettings.key()
    needs_calibration(settings), prepare(model, layers, batches, settings)
                               a model-level step on the float model before any layer is quantized (calibration
                               sentences; apply.prepare_for_plan runs it)
`apply` uses only this interface; `get_backend(name)` imports the module on first use, so a user of
bitsandbytes never pays for importing torchao and the reverse.
"""

import importlib
import logging
import warnings
from dataclasses import dataclass

from ..common import EWQError

# Harmless noise, silenced once for every entry point (transformers may import torchao before we do):
# torchao's wheel carries CUDA/cutlass extensions that fail to load on a CPU and log it; it registers enums
# the old way with torch's pytree; and its tensor subclasses lack a hash for torch.compile's on-disk cache.
logging.getLogger("torchao").setLevel(logging.ERROR)
# bitsandbytes: a notice on every 8-bit forward, and on import a note that an optional CPU 4-bit kernel package
# ("kernels") is absent; its own fallback kernel runs instead
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")

BACKEND_MODULES = {"bitsandbytes": "bnb", "torchao": "ao", "torch-dynamic": "torch_dynamic", "llama.cpp": "llamacpp",
                   "onnxruntime": "onnxruntime"}
BACKENDS = tuple(BACKEND_MODULES)
QUANT_TYPES = ("nf4", "fp4")
GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class QuantSettings:
    backend: str = "bitsandbytes"
    quant_type: str = "nf4"     # bitsandbytes 4-bit data type
    double_quant: bool = False  # bitsandbytes: also quantize the 4-bit absmax statistics
    threshold: float = 6.0      # bitsandbytes LLM.int8 outlier threshold on activations
    group_size: int = 64        # torchao int4: weights per (scale, zero point) group along the input dimension
    int8_activations: bool = False  # torchao 8-bit: also quantize activations per token (int8 x int8 matmul)
    formats: tuple = ()         # llama.cpp: the ggml types a plan may choose from (empty: the backend's menu)
    imatrix: str = "calibration"  # llama.cpp: rounding weighted by "calibration" importance, "none", or an imatrix file
    weight_scales: str = "tensor"  # torch-dynamic: one weight scale per matrix ("tensor") or per output row ("channel")
    act_bits: int = 7              # torch-dynamic: activation range, 7 (torch's reduce_range) or 8 (needs VNNI)
    outlier_channels: int = 0      # torch-dynamic: up to this many input channels per matrix kept in fp32

    def key(self) -> dict:
        """What changes the numbers a backend produces (for caches and result files)."""
        if self.backend == "bitsandbytes":
            return {"backend": self.backend, "quant_type": self.quant_type, "double_quant": self.double_quant,
                    "int8_threshold": self.threshold}
        if self.backend == "torchao":
            extra = {"int8_activations": True} if self.int8_activations else {}  # absent when off: older keys stay valid
            return {"backend": self.backend, "group_size": self.group_size, **extra,
                    **get_backend(self.backend).formats(self)}
        if self.backend in ("llama.cpp", "onnxruntime"):
            return {"backend": self.backend, **get_backend(self.backend).formats(self)}
        if self.backend == "torch-dynamic":  # its options are absent at their defaults: older keys stay valid
            return {"backend": self.backend, **get_backend(self.backend).key(self)}
        return {"backend": self.backend}


def get_backend(name: str):
    if name not in BACKEND_MODULES:
        raise EWQError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{BACKEND_MODULES[name]}")


def float_weight(module):
    """(weight [out, in], bias) of a Linear or a transformers Conv1D (stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.data.t().contiguous(), module.bias
    return module.weight.data, module.bias


def as_linear(module, dtype, device="cpu"):
    """A new nn.Linear holding the float layer's weights in `dtype` (Conv1D transposed); the layer is not changed."""
    import torch
    from torch import nn

    weight, bias = float_weight(module)
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.data.to(device=device, dtype=dtype), requires_grad=False)
    with torch.no_grad():
        return lin.eval()
