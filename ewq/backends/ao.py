"""torchao (PyTorch's own quantization library): weight-only formats, activations stay in the run dtype.

8-bit: Int8WeightOnlyConfig, int8 weights with one scale per output row; with --int8-activations
       Int8DynamicActivationInt8WeightConfig: activations quantized too, one scale per token (not one per
       tensor as in torch's dynamic int8), so the matmul is int8 x int8: faster where the work is compute-
       bound (encoders, prefill), and far closer to the original than per-tensor activation scales.
4-bit: int4 weight-only with HQQ-chosen scale and zero point per group of `group_size` input weights:
       on the CPU `PrototypeInt4WeightOnlyConfig` (Int4OpaqueTensor, the CPU tinygemm kernel; group sizes
       32/64/128), on CUDA `Int4WeightOnlyConfig` in the tile-packed tinygemm layout (bfloat16 only).
Each layer is quantized through torchao's `quantize_` with the config its plan precision asks for; the same configs,
keyed by weight name (fqn_config), are the TorchAoConfig with which transformers quantizes while loading
(apply.load_for_plan, ewq.hf). Saved models use transformers' torchao layout: int8 and CUDA int4 are torchao's own
allow-listed classes; CPU int4, whose packing depends on the CPU, is stored in EWQ's portable form (ewq.hf).
torchao skips, with only a log line, a layer whose input size is not a multiple of the group size; we
ask first (`unsupported`) so the caller can say which layer and keep it in the run dtype.
"""

import torch

from ..common import EWQError
from . import GROUP_SIZES, as_linear

PRECISIONS = ("8-bit", "4-bit")
COMPILES = True
COMPILE_NOTE = None
SAVE_METHOD = "ewq-torchao"  # saved in transformers' torchao layout (torchao.prototype.safetensors; CPU int4: ewq.hf)
CPU_GROUP_SIZES = (32, 64, 128)


def _import():
    import torchao  # noqa: F401  (its import-time noise is silenced in ewq.backends)

    return torchao


def check(settings, dtype, device: str) -> None:
    sizes = CPU_GROUP_SIZES if device == "cpu" else GROUP_SIZES
    if settings.group_size not in sizes:
        raise EWQError(f"torchao int4 on {device} takes --group-size {', '.join(map(str, sizes))}, "
                       f"got {settings.group_size}")
    if device != "cpu" and dtype != torch.bfloat16:
        raise EWQError(f"torchao's CUDA int4 kernel (tinygemm) runs in bfloat16 only; pass --dtype bfloat16 "
                       f"(got {str(dtype).replace('torch.', '')})")


def cannot_save(precisions, device: str):
    return None  # int8 and CUDA int4 through torchao's safetensors support; CPU int4 in EWQ's portable form (ewq.hf)


def unsupported(shape, precision: str, settings):
    out_f, in_f = shape
    if precision == "4-bit" and in_f % settings.group_size:
        return f"input size {in_f} is not a multiple of --group-size {settings.group_size}"
    return None


def config(precision: str, settings, device: str):
    _import()
    if precision == "8-bit":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        return Int8DynamicActivationInt8WeightConfig() if settings.int8_activations else Int8WeightOnlyConfig()
    if precision == "4-bit":
        if device == "cpu":
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=settings.group_size, int4_choose_qparams_algorithm="hqq")
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=settings.group_size, int4_packing_format="tile_packed_to_4d",
                                    int4_choose_qparams_algorithm="hqq")
    raise EWQError(f"unknown precision '{precision}'")


def fqn_config(targets: dict, settings, device: str = "cpu"):
    """torchao's FqnToConfig for {"<module>.weight": precision}, the form transformers' TorchAoConfig takes to quantize
    exactly these layers while loading. Keys name the weight parameter: with a bare module name transformers (5.23)
    also applies the config to the module's bias (FqnToConfig({"bias": config})) and a Linear with a bias breaks.
    Raw layers are simply absent and there is no "_default", so nothing else is touched. One config object per
    precision, as quantize_layer uses."""
    _import()
    from torchao.quantization import FqnToConfig

    configs = {p: config(p, settings, device) for p in sorted(set(targets.values()))}
    return FqnToConfig({fqn: configs[p] for fqn, p in targets.items()})


def quantize_layer(module, precision: str, settings, dtype, device: str = "cpu"):
    _import()
    from torchao.quantization import quantize_

    lin = as_linear(module, dtype, device)  # a fresh Linear ([out, in], Conv1D transposed): quantize_ works in place
    reason = unsupported(tuple(lin.weight.shape), precision, settings)
    if reason:
        raise EWQError(f"torchao cannot quantize this layer to {precision}: {reason}")
    quantize_(lin, config(precision, settings, device), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    return lin


def is_torchao_tensor(t) -> bool:
    """A weight quantized by torchao: one of its tensor subclasses (checked without importing torchao)."""
    return type(t).__module__.startswith("torchao.")


def state_bytes(module) -> int:
    return 0  # torchao keeps everything in the weight tensor subclass; apply counts its inner tensors


def formats(settings) -> dict:
    return {"8-bit": "int8 weights per row and int8 activations per token (Int8DynamicActivationInt8WeightConfig)"
            if settings.int8_activations else "int8 weight-only, per row (Int8WeightOnlyConfig)",
            "4-bit": f"int4 weight-only, HQQ scale and zero point per group of {settings.group_size} (tinygemm layout)"}


def dequantize(module):
    """The float weight [out, in] a quantized layer computes with, for the fast sensitivity sweep (None where the
    layer also quantizes its activations: then the sweep runs the layer itself). int8: torchao's own dequantize;
    CPU int4 (Int4OpaqueTensor has no dequantize): the layer applied to the identity, in the layer's dtype (bf16:
    the kernel's fast path; its fp32 path is ~100x slower), which returns the dequantized weight exactly up to the
    output's rounding."""
    weight = module.weight
    if type(weight).__name__ == "Int8Tensor" and getattr(weight, "act_quant_kwargs", None) is None:
        return weight.dequantize().float()
    if type(weight).__name__ == "Int4OpaqueTensor":
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            out = torch.nn.functional.linear(eye, weight)
        return out.T.float()
    return None
