"""bitsandbytes: LLM.int8 (Linear8bitLt, int8 weights and int8 activations with an fp16 outlier path) and
nf4/fp4 (Linear4bit, one fp32 absmax per 64 weights). The published proof of concept's executor.
On this project's CPU it dequantizes per call and decodes slower than bf16 (docs/RESULTS.md)."""

import logging

from torch import nn

from ..common import EWQError
from . import QUANT_TYPES, float_weight

PRECISIONS = ("8-bit", "4-bit")
COMPILES = False
COMPILE_NOTE = ("bitsandbytes layers are not compiled here: their CPU kernels and the Int8Params/Params4bit "
                "parameter classes break torch.compile graphs, so --compile would time the same eager kernels")
SAVE_METHOD = "ewq-bitsandbytes"


def quiet():
    """bitsandbytes logs a cast warning on every 8-bit forward and a notice on import; keep errors only."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def check(settings, dtype, device: str) -> None:
    if settings.quant_type not in QUANT_TYPES:
        raise EWQError(f"unknown 4-bit type '{settings.quant_type}'; choose one of {', '.join(QUANT_TYPES)}")


def cannot_save(precisions, device: str):
    return None


def unsupported(shape, precision: str, settings):
    return None  # bitsandbytes takes any Linear shape


def quantize_layer(module, precision: str, settings, dtype, device: str = "cpu"):
    import bitsandbytes as bnb

    quiet()
    weight, bias = float_weight(module)
    weight = weight.to("cpu")  # bitsandbytes quantizes when CPU data moves to the target device
    out_f, in_f = weight.shape
    has_bias = bias is not None
    if precision == "8-bit":
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=settings.threshold,
                                  device="meta")
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif precision == "4-bit":
        new = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=dtype, quant_type=settings.quant_type,
                                compress_statistics=settings.double_quant, device="meta")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=settings.quant_type,
                                       compress_statistics=settings.double_quant, module=new)
    else:
        raise EWQError(f"unknown precision '{precision}'")
    if has_bias:
        new.bias = nn.Parameter(bias.data.to(dtype), requires_grad=False)
    new = new.to(device)  # bitsandbytes quantizes here
    if precision == "4-bit":
        # The AVX512-BF16 fast path repacks 4-bit weights in place on the first forward; the saved or
        # measured state must not depend on whether a forward ran, so keep the portable layout.
        new.support_avx512bf16_for_cpu = False
    return new.eval()  # new bitsandbytes modules start in train mode


def _bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def state_bytes(module) -> int:
    """8-bit row scales (SCB); 4-bit quantization state (absmax, code book, nested statistics)."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = getattr(module.weight, "SCB", None)
        return _bytes(scb if scb is not None else module.state.SCB)
    if isinstance(module, bnb.nn.Linear4bit):
        qs = module.weight.quant_state
        total = _bytes(qs.absmax) + _bytes(qs.code) + _bytes(getattr(qs, "offset", None))
        if qs.nested:
            total += _bytes(qs.state2.absmax) + _bytes(qs.state2.code)
        return total
    return 0


def formats(settings) -> dict:
    return {"8-bit": f"LLM.int8 (Linear8bitLt, outlier threshold {settings.threshold:g})",
            "4-bit": f"{settings.quant_type} g64 (Linear4bit{', double quant' if settings.double_quant else ''})"}


def dequantize(module):
    """The float weight of a 4-bit layer (nf4/fp4 are weight-only: bitsandbytes' own dequantize_4bit); None for
    LLM.int8, which also quantizes its activations (the fast sweep then runs the layer)."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return None
