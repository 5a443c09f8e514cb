"""Stage 4: load the original checkpoint on the CPU and apply a plan block by block.

8-bit blocks: every Linear (and GPT-2 Conv1D) becomes bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False)
  (LLM.int8, outlier threshold 6.0 by default), or, with backend "torch-dynamic", torch's dynamic
  int8 quantization (torch.ao.quantization.quantize_dynamic, the user's existing CPU method).
4-bit blocks: bitsandbytes.nn.Linear4bit (nf4 or fp4, optional double quantization).
raw blocks, embeddings, norms and lm_head stay in the run dtype.

Each replaced layer is built on the meta device and quantized from the float weight it replaces, so
at most one layer exists twice at any moment: never two copies of the model.
"""

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .common import EWQError

BACKENDS = ("bitsandbytes", "torch-dynamic")
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class QuantSettings:
    backend: str = "bitsandbytes"
    quant_type: str = "nf4"
    double_quant: bool = False
    threshold: float = 6.0  # LLM.int8 outlier threshold on activations


def quiet_bitsandbytes():
    """bitsandbytes logs a cast warning on every 8-bit forward and a notice on import; keep errors only."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load_model(path, dtype: torch.dtype):
    """The original model on the CPU, safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                                     device_map="cpu")
    except (OSError, ValueError) as e:
        raise EWQError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from None
    return model.eval()


def block_list(model, block_prefix: str) -> nn.ModuleList:
    """The ModuleList of transformer blocks, named as in the checkpoint (`model.layers`, `transformer.h`)."""
    for prefix in (block_prefix, f"transformer.{block_prefix}", f"model.{block_prefix}"):
        try:
            blocks = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise EWQError(f"the loaded model has no block list at '{block_prefix}'; the plan does not fit this architecture")


def _float_weight(module):
    """(weight [out, in], bias) of a Linear or a transformers Conv1D (stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.data.t().contiguous(), module.bias
    return module.weight.data, module.bias


def quantizable_layers(block):
    from transformers.pytorch_utils import Conv1D

    return [(name, m) for name, m in block.named_modules() if type(m) in (nn.Linear, Conv1D)]


def quantize_layer(module, precision: str, settings: QuantSettings, dtype: torch.dtype, device: str = "cpu"):
    """A bitsandbytes copy of a float Linear/Conv1D; the float layer itself is left untouched."""
    import bitsandbytes as bnb

    weight, bias = _float_weight(module)
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


def dynamic_int8_block(block):
    """The user's existing CPU method, applied to one block: torch dynamic PTQ of its Linear layers."""
    from transformers.pytorch_utils import Conv1D

    for name, m in quantizable_layers(block):
        if isinstance(m, Conv1D):  # quantize_dynamic only knows nn.Linear
            weight, bias = _float_weight(m)
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            lin.weight.data, lin.bias.data = weight, bias.data
            block.set_submodule(name, lin)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated but still works in 2.13
        torch.ao.quantization.quantize_dynamic(block, {nn.Linear}, dtype=torch.qint8, inplace=True)


def apply_plan(model, plan: dict, settings: QuantSettings, dtype: torch.dtype, progress: bool = True) -> float:
    """Replace the layers of every non-raw block in place. Returns the seconds it took."""
    quiet_bitsandbytes()
    if settings.backend not in BACKENDS:
        raise EWQError(f"unknown backend '{settings.backend}'; choose one of {', '.join(BACKENDS)}")
    if settings.quant_type not in QUANT_TYPES:
        raise EWQError(f"unknown 4-bit type '{settings.quant_type}'; choose one of {', '.join(QUANT_TYPES)}")
    blocks = block_list(model, plan["model"]["block_prefix"])
    if len(blocks) != plan["model"]["block_count"]:
        raise EWQError(f"the model has {len(blocks)} blocks, the plan {plan['model']['block_count']}")
    precisions = {b["index"]: b["precision"] for b in plan["blocks"]}
    if settings.backend == "torch-dynamic":
        four = sorted(i for i, p in precisions.items() if p == "4-bit")
        if four:
            raise EWQError(f"the torch-dynamic backend has no 4-bit: the plan puts blocks {four[:8]} at 4-bit; "
                           f"use --backend bitsandbytes, or edit those blocks to 8-bit or raw")
        if dtype != torch.float32:
            raise EWQError("the torch-dynamic backend runs in float32 only; pass --dtype float32")
    start = time.perf_counter()
    todo = [i for i in sorted(precisions) if precisions[i] != "raw"]
    for i in tqdm(todo, desc="quantizing blocks", disable=not progress, leave=False):
        if settings.backend == "torch-dynamic":
            dynamic_int8_block(blocks[i])
            continue
        for name, layer in quantizable_layers(blocks[i]):
            blocks[i].set_submodule(name, quantize_layer(layer, precisions[i], settings, dtype))
    return time.perf_counter() - start


# ---- exact weight bytes, counted from the tensors the model really holds ----

def _bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def layer_state_bytes(module) -> int:
    """Bytes a layer keeps beyond its registered parameters and buffers: 8-bit row scales,
    4-bit quantization state (absmax, code book, nested statistics), torch-dynamic packed weights."""
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
    packed = getattr(module, "_packed_params", None)
    if packed is not None and hasattr(packed, "_weight_bias"):
        w, b = packed._weight_bias()
        if w.qscheme() == torch.per_tensor_affine:
            scales = 16  # one float64 scale + one int64 zero point
        else:
            scales = 16 * w.q_per_channel_scales().numel()
        return w.numel() * w.element_size() + _bytes(b) + scales
    return 0


def weight_bytes_by_precision(model, plan: dict | None) -> dict:
    """Bytes of every weight tensor, grouped by the precision of the block that holds it;
    everything outside the blocks (embeddings, norms, lm_head) is `other`. Tied tensors count once."""
    groups = {"raw": 0, "8-bit": 0, "4-bit": 0, "other": 0}
    seen_tensors, seen_modules = set(), set()

    def count(modules, group):
        for m in modules:
            if id(m) in seen_modules:
                continue
            seen_modules.add(id(m))
            for t in m.parameters(recurse=False):  # buffers (rotary tables, causal masks) are not weights
                key = (t.data_ptr(), t.numel())
                if t.numel() and key not in seen_tensors:
                    seen_tensors.add(key)
                    groups[group] += _bytes(t)
            groups[group] += layer_state_bytes(m)

    if plan:
        precisions = {b["index"]: b["precision"] for b in plan["blocks"]}
        for i, block in enumerate(block_list(model, plan["model"]["block_prefix"])):
            count(block.modules(), precisions[i])
    count(model.modules(), "other")  # what is left: embeddings, final norm, lm_head
    return groups
