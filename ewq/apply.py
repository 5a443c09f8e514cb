"""Stage 4: load the original checkpoint on the CPU and apply a plan, layer by layer.

Every block Linear (and GPT-2 Conv1D) gets the precision its plan gives it: the block's `precision`,
or, in a per-matrix plan, the entry for that matrix in the block's `matrices`. The executor of 8-bit
and 4-bit layers is a backend (ewq/backends/: bitsandbytes, torchao, torch-dynamic), all behind one
interface. raw layers, embeddings, norms and lm_head stay in the run dtype.

Each replaced layer is built from the float weight it replaces, so at most one layer exists twice at
any moment: never two copies of the model.
"""

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .backends import BACKENDS, GROUP_SIZES, QUANT_TYPES, QuantSettings, get_backend  # noqa: F401 (re-exported)
from .common import EWQError
from .plan import layer_precision, precisions_used


@dataclass
class Applied:
    seconds: float = 0.0
    kept_raw: list = field(default_factory=list)  # "block.matrix: why" for layers the backend's kernel cannot take


def model_class(kind: str):
    """Decoders load with their LM head (generate); encoders as the bare encoder (AutoModel: no MLM/classifier
    head, whose weights an embedding model does not use; transformers drops them with a note)."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if kind == "encoder" else AutoModelForCausalLM


def load_model(path, dtype: torch.dtype, kind: str = "decoder"):
    """The original model on the CPU, safetensors only, no remote code."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "some weights were not used" (an MLM head under AutoModel) is expected
    try:
        model = model_class(kind).from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                                  device_map="cpu")
    except (OSError, ValueError) as e:
        raise EWQError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from None
    return model.eval()


def block_list(model, block_prefix: str) -> nn.ModuleList:
    """The ModuleList of transformer blocks, named as in the checkpoint (`model.layers`, `transformer.h`)."""
    # an encoder loaded bare (AutoModel) has `encoder.layer` where its checkpoint said `bert.encoder.layer`
    for prefix in (block_prefix, f"transformer.{block_prefix}", f"model.{block_prefix}", block_prefix.partition(".")[2]):
        try:
            blocks = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise EWQError(f"the loaded model has no block list at '{block_prefix}'; the plan does not fit this architecture")


def quantizable_layers(block):
    """The float Linear/Conv1D layers of a block (what a plan can quantize), by name within the block."""
    return [(name, m) for name, m in block.named_modules() if type(m) in (nn.Linear,) + _conv1d()]


def linear_layers(block):
    """Every linear layer of a block, float or already quantized by any backend, by name within the block."""
    return [(name, m) for name, m in block.named_modules()
            if isinstance(m, (nn.Linear, torch.ao.nn.quantized.Linear) + _conv1d())]


def matrix_shape(module) -> tuple:
    """[out, in] of a Linear or Conv1D."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if type(module).__name__ == "Conv1D" else tuple(w.shape)


def is_float_layer(module) -> bool:
    """A Linear/Conv1D still holding plain float weights (raw, or kept raw because a kernel could not take it)."""
    return type(module) in (nn.Linear,) + _conv1d() and type(module.weight) in (torch.Tensor, nn.Parameter) \
        and module.weight.is_floating_point()


def _conv1d() -> tuple:
    from transformers.pytorch_utils import Conv1D

    return (Conv1D,)


def quantize_layer(module, precision: str, settings: QuantSettings, dtype: torch.dtype, device: str = "cpu"):
    """A quantized copy of a float Linear/Conv1D made by the settings' backend; the float layer is untouched."""
    return get_backend(settings.backend).quantize_layer(module, precision, settings, dtype, device)


def check_backend(plan: dict, settings: QuantSettings, dtype, device: str):
    """Refuse, before any work, what the backend cannot run. Returns the backend module."""
    backend = get_backend(settings.backend)
    backend.check(settings, dtype, device)
    missing = sorted(precisions_used(plan) - {"raw"} - set(backend.PRECISIONS))
    if missing:
        where = [b["index"] for b in plan["blocks"] if b["precision"] in missing
                 or set((b.get("matrices") or {}).values()) & set(missing)]
        raise EWQError(f"the {settings.backend} backend has no {'/'.join(missing)}: the plan uses it in blocks "
                       f"{where[:8]}; use another --backend, or edit those entries to "
                       f"{' or '.join(['raw'] + list(backend.PRECISIONS))}")
    return backend


def plan_layers(model, plan: dict, layers=quantizable_layers):
    """[(block index, block module, matrix name, layer, precision)] for every layer `layers` finds in a block,
    checking that the plan's per-matrix entries name matrices this model has."""
    blocks = block_list(model, plan["model"]["block_prefix"])
    if len(blocks) != plan["model"]["block_count"]:
        raise EWQError(f"the model has {len(blocks)} blocks, the plan {plan['model']['block_count']}")
    out = []
    for b in sorted(plan["blocks"], key=lambda b: b["index"]):
        found = layers(blocks[b["index"]])
        names = {n for n, _ in found}
        unknown = sorted(set(b.get("matrices") or {}) - names)
        if unknown:
            raise EWQError(f"the plan names matrix '{unknown[0]}' in block {b['index']}, which this model does not "
                           f"have; its matrices are {', '.join(sorted(names))}")
        out += [(b["index"], blocks[b["index"]], n, m, layer_precision(b, n)) for n, m in found]
    return out


def apply_plan(model, plan: dict, settings: QuantSettings, dtype: torch.dtype, progress: bool = True,
               device: str = "cpu") -> Applied:
    """Replace every non-raw layer in place (quantized on `device`)."""
    backend = check_backend(plan, settings, dtype, device)
    start = time.perf_counter()
    applied = Applied()
    todo = [entry for entry in plan_layers(model, plan) if entry[4] != "raw"]
    for index, block, name, layer, precision in tqdm(todo, desc="quantizing layers", disable=not progress, leave=False):
        reason = backend.unsupported(matrix_shape(layer), precision, settings)
        if reason:  # the kernel cannot take it: keep it in the run dtype and say so
            applied.kept_raw.append(f"block {index} {name}: {reason}")
            continue
        block.set_submodule(name, backend.quantize_layer(layer, precision, settings, dtype, device))
    applied.seconds = time.perf_counter() - start
    return applied


# ---- exact weight bytes, counted from the tensors the model really holds ----

def is_tensor_subclass(t) -> bool:
    """A wrapper tensor subclass (torchao's quantized weights): its bytes live in the tensors inside it."""
    return hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter)


def tensor_bytes(t) -> int:
    """Bytes of a tensor; for a tensor subclass, of the tensors inside it."""
    if t is None:
        return 0
    if is_tensor_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def layer_state_bytes(module) -> int:
    """Bytes a layer keeps beyond its registered parameters (bitsandbytes scales and quantization state,
    torch-dynamic packed weights), whichever backend made it."""
    return sum(get_backend(name).state_bytes(module) for name in BACKENDS)


def weight_bytes_by_precision(model, plan: dict | None) -> dict:
    """Bytes of every weight tensor, grouped by the precision of the layer that holds it; everything else
    (embeddings, norms, lm_head) is `other`. Tied tensors count once."""
    groups = {"raw": 0, "8-bit": 0, "4-bit": 0, "other": 0}
    seen_tensors, seen_modules = set(), set()

    def count(modules, group):
        for m in modules:
            if id(m) in seen_modules:
                continue
            seen_modules.add(id(m))
            for t in m.parameters(recurse=False):  # buffers (rotary tables, causal masks) are not weights
                key = id(t) if is_tensor_subclass(t) else (t.data_ptr(), t.numel())
                if t.numel() and key not in seen_tensors:
                    seen_tensors.add(key)
                    groups[group] += tensor_bytes(t)
            groups[group] += layer_state_bytes(m)

    if plan:
        for _, _, _, layer, precision in plan_layers(model, plan, linear_layers):
            count(layer.modules(), "raw" if is_float_layer(layer) else precision)
    count(model.modules(), "other")  # what is left: embeddings, norms, lm_head
    return groups
