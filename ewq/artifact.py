"""Quantized models on disk: save a mixed raw/8-bit/4-bit model once, load it without re-quantizing.

transformers cannot save or load one model whose blocks mix 8-bit and 4-bit bitsandbytes layers, so a
saved model is a directory of our own making:
    model.safetensors   every tensor of the quantized model (int8 data + row scales; packed 4-bit data
                        + its quantization state, as bitsandbytes' own state dict writes them; for the
                        torch-dynamic backend, int8 data + per-tensor (or per-row) scale and zero point, and any
                        outlier channels' indices and fp32 weight columns; for torchao,
                        transformers' torchao layout: see below)
    config.json, generation_config.json, tokenizer files
    plan.json           the plan that made it
    metadata.json       is_quantized: true, method (ewq-bitsandbytes, ewq-torchao or dynamic-ptq-int8), base model
                        and fingerprints, counts, sizes, versions (torchao's and the CPU's capability for torchao)
It is written under a temporary name and renamed when complete, so a crash leaves nothing that looks
finished. Its name is <model>-<plan hash>-<executor digest> (artifact_name): the digest covers everything beside the plan
that changes the tensors (the executor and its settings as QuantSettings.key() describes them, the dtype, the device),
and is left out for the tool's default (bitsandbytes at its defaults, the CPU's default dtype), whose saves keep the
name older EWQ versions gave them. A directory of that name is reused only when it holds the same content
(content_key: plan, the plan's precisions, executor); anything else under the name is refused in one line. Loading builds the skeleton on the meta device (accelerate's init_empty_weights), puts the
plan's layer types in place and assigns the saved tensors (Params4bit.from_prequantized for 4-bit;
torchao's unflatten_tensor_state_dict rebuilds its weight tensors).

A torchao save is also a model transformers loads by itself: model.safetensors is what save_pretrained writes for a
model loaded with a TorchAoConfig (torchao's flatten_tensor_state_dict, its description in the header: allow-listed
classes only, no pickle) and config.json carries the matching quantization_config (ewq.hf). CPU int4 weights are
stored in EWQ's portable form (ewq.hf.EwqInt4CpuTensor, repacked for the loading CPU), which needs `import ewq.hf`
before from_pretrained; metadata.json says so (`hf_needs_import`). Before any tensor is read, a torchao that cannot
rebuild what the file holds is refused in one line (ewq.hf.check_readable).
"""

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .analysis import fingerprint_in_memory
from .apply import (
    block_list,
    gpus_of,
    memory_budget,
    model_class,
    quantizable_layers,
    weight_bytes_by_precision,
)
from .backends import BACKENDS as BACKEND_NAMES
from .backends import QuantSettings, get_backend
from .backends.ao import is_torchao_tensor
from .backends.bnb import quiet as quiet_bitsandbytes
from .checkpoint import open_checkpoint
from .common import EWQError, write_json_atomic
from .device import pick_dtype
from .plan import layer_precision, load_plan, other_matrices, plan_hash

# metadata.json `method` of a saved model <-> the backend that made it (backends whose SAVE_METHOD is None cannot save)
METHODS = {b: get_backend(b).SAVE_METHOD for b in BACKEND_NAMES if get_backend(b).SAVE_METHOD}
BACKENDS = {method: backend for backend, method in METHODS.items()}
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling", "2_Normalize")


def read_metadata(path) -> dict | None:
    meta = Path(path) / "metadata.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EWQError(f"{meta} is not valid JSON ({e}); restore or delete it") from None


# ---- names and content keys: what a saved model (or an exported GGUF) is reused for ----

def digest(obj, n: int = 8) -> str:
    """A short hash of a JSON-able description (names of files whose content it describes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def plan_assignment(plan: dict) -> dict:
    """The precision of every matrix the plan sets. plan_hash covers the weights and the method, not the precisions,
    which a person may edit in the plan file; a reused file must match them too."""
    return {"blocks": [[b["index"], b["precision"], b.get("matrices") or {}]
                       for b in sorted(plan["blocks"], key=lambda b: b["index"])],
            "other": other_matrices(plan)}


def executor_key(settings, dtype, device_type: str = "cpu") -> dict:
    """What, beside the plan, changes a quantized model's tensors: the executor and its settings (QuantSettings.key(),
    the one description of what changes the numbers), the dtype of raw blocks and scales, the device it was quantized
    on (torchao's int4 layout differs between CPU and CUDA)."""
    return {**settings.key(), "dtype": dtype_name(dtype), "device_type": device_type.split(":")[0]}


def default_executor_key(kind: str = "decoder") -> dict:
    """The executor key older EWQ names stand for: bitsandbytes at its defaults, on the CPU, in the CPU's dtype."""
    default = QuantSettings()
    return executor_key(default, pick_dtype(None, "cpu", default.backend, kind))


def content_key(plan: dict, settings, dtype, device_type: str = "cpu") -> dict:
    """Everything a saved model's tensors depend on: the plan (weights fingerprint and method), its precisions and
    the executor key."""
    return {"plan_hash": plan_hash(plan), "assignment": plan_assignment(plan),
            "executor": executor_key(settings, dtype, device_type)}


def model_base_name(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_id.rstrip("/")).name or "model").strip("-") or "model"


def artifact_name(model_id: str, plan: dict, settings, dtype, device_type: str = "cpu") -> str:
    """<model>-<plan hash>-<executor digest>; the tool's default executor keeps the older <model>-<plan hash>."""
    name = f"{model_base_name(model_id)}-{plan_hash(plan)}"
    key = executor_key(settings, dtype, device_type)
    return name if key == default_executor_key(plan["model"].get("kind", "decoder")) else f"{name}-{digest(key)}"


def gguf_name(model_id: str, plan: dict, tensor_types: dict) -> str:
    """The file name a plan's GGUF is written to and reused from: <model>-<plan hash>-<types digest>.gguf. A GGUF's
    content is the plan's weights (the plan hash covers their fingerprint) and the ggml type of every tensor (export.
    tensor_types: the plan's precisions and the checkpoint's 16-bit type for raw ones); llama.cpp's --formats only
    choose among types when planning, so they are in the plan hash, not here."""
    return f"{model_base_name(model_id)}-{plan_hash(plan)}-{digest(tensor_types)}.gguf"


def saved_settings(meta: dict) -> QuantSettings:
    """The executor settings a save recorded in its metadata.json (fields absent in older saves: their defaults)."""
    if meta.get("method") not in BACKENDS:
        raise EWQError(f"metadata.json names method {meta.get('method')!r}; EWQ saves one of {', '.join(BACKENDS)}")
    return QuantSettings(BACKENDS[meta["method"]], meta.get("quant_type", QuantSettings.quant_type),
                         meta.get("double_quant", False), meta.get("int8_threshold", QuantSettings.threshold),
                         meta.get("group_size", 64), meta.get("int8_activations", False),  # (absent before torchao saves)
                         **{k: meta[k] for k in ("weight_scales", "act_bits", "outlier_channels") if k in meta})


def saved_content_key(path) -> dict:
    """content_key of a directory written by save_quantized, from its metadata.json and plan.json (older saves
    included: they record every setting, and were quantized on the device their metadata names, else the CPU)."""
    path = Path(path)
    meta = read_metadata(path) or {}
    try:
        plan = load_plan(path / "plan.json")
        return content_key(plan, saved_settings(meta), getattr(torch, meta["dtype"]), meta.get("device_type", "cpu"))
    except (EWQError, KeyError, AttributeError) as e:
        raise EWQError(f"{path} looks like a saved model but cannot be read ({str(e)[:160]}); move or delete it, then "
                       f"save again") from None


def content_differences(saved: dict, wanted: dict) -> list:
    """What differs between two content keys, in words, for the refusal."""
    out = []
    if saved["plan_hash"] != wanted["plan_hash"]:
        out.append(f"plan {saved['plan_hash']} there, {wanted['plan_hash']} now")
    if saved["assignment"] != wanted["assignment"]:
        out.append("other precisions (the plan was edited since)")
    s, w = saved["executor"], wanted["executor"]
    if s.get("backend") != w.get("backend"):
        out.append(f"backend {s.get('backend')} there, {w.get('backend')} now")
    else:
        out += [f"{k} {s.get(k)} there, {w.get(k)} now" for k in sorted(set(s) | set(w)) if s.get(k) != w.get(k)]
    return out


def save_quantized(model, plan: dict, source, fingerprint: str, tokenizer, settings, dtype, root) -> tuple:
    """Write the quantized model to root/artifact_name(...)/. Returns (path, written now?): an existing save of the same
    content is left as it was; a different model under the name is refused."""
    root = Path(root)
    if any(p.device.type == "meta" for p in model.parameters()):  # accelerate keeps offloaded blocks' tensors apart
        raise EWQError("this model has raw blocks offloaded (--max-memory); a saved model holds every weight: drop "
                       "--save, or save from a run where the whole model fits")
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    target = root / artifact_name(source.id, plan, settings, dtype, device_type)
    if (target / "metadata.json").is_file():
        differences = content_differences(saved_content_key(target), content_key(plan, settings, dtype, device_type))
        if differences:
            raise EWQError(f"{target} already holds another model of this plan ({'; '.join(differences)}), saved by an "
                           f"older EWQ that named saves by plan only, or before the plan was edited; move or delete it, "
                           f"then save again")
        return target, False  # saved before with the same content: never overwritten
    tmp = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if settings.backend == "torchao":  # transformers' own torchao layout: from_pretrained(tmp) reads it as well
            tensors, header = hf_module().hf_tensors(model)
            save_file(tensors, tmp / "model.safetensors", metadata=header)
            hf_module().saved_config(model, plan, settings, dtype).save_pretrained(tmp)
        else:
            tensors = state_tensors(model)
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "ewq_plan_hash": plan_hash(plan)})
            model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in SENTENCE_TRANSFORMERS_FILES:  # an encoder's pooling travels with it
            if (source.path / name).is_dir():
                shutil.copytree(source.path / name, tmp / name)
            elif (source.path / name).is_file():
                shutil.copy2(source.path / name, tmp / name)
        write_json_atomic(tmp / "plan.json", plan)
        by_precision = weight_bytes_by_precision(model, plan)
        block_bytes = sum(v for k, v in by_precision.items() if k != "other")
        write_json_atomic(tmp / "metadata.json", {
            "schema_version": 1, "is_quantized": True, "method": METHODS[settings.backend],
            "kind": plan["model"].get("kind", "decoder"),
            "base_model": source.id, "base_path": str(source.path), "base_fingerprint": fingerprint,
            "artifact_fingerprint": fingerprint_in_memory(open_checkpoint(tmp), tensors),
            "plan_hash": plan_hash(plan), "counts": plan["counts"], "matrix_counts": plan.get("matrix_counts"),
            "weight_bytes": sum(by_precision.values()),
            "weight_bytes_by_precision": by_precision,
            "avg_bits_per_weight": 8 * block_bytes / plan["size"]["block_params"],
            "dtype": str(dtype).replace("torch.", ""), "quant_type": settings.quant_type,
            "double_quant": settings.double_quant, "int8_threshold": settings.threshold,
            "group_size": settings.group_size, "int8_activations": settings.int8_activations,
            "device_type": device_type, "executor": settings.key(),
            **(torchao_record(model, header) if settings.backend == "torchao" else {}),
            **(get_backend("torch-dynamic").key(settings) if settings.backend == "torch-dynamic" else {}),
            "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, True


def hf_module(saved_with: str | None = None):
    """ewq.hf, imported on first use: it imports torchao (and registers EWQ's CPU int4 form with it), which only
    torchao saves need; a bitsandbytes user never pays for it. A torchao without the safetensors support these saves
    use is refused in one line."""
    try:
        from . import hf
    except ImportError as e:
        import torchao

        raise EWQError(f"torchao {getattr(torchao, '__version__', '?')} cannot read or write EWQ's torchao saves "
                       f"({e}); install torchao=={saved_with or '0.18.0'}") from None
    return hf


def torchao_record(model, header: dict) -> dict:
    """What a torchao save adds to metadata.json: the versions that wrote it, the CPU it was made on (CPU int4 is
    stored unpacked and repacked for the loading CPU, so a save moves between AVX-512 and AVX2 machines), and how
    plain transformers loads it."""
    import torchao
    import transformers

    loadable = hf_module().hf_form(model)
    return {"torchao_version": torchao.__version__, "transformers_version": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "hf_loadable": loadable,
            "hf_needs_import": "ewq.hf" if loadable and hf_module().needs_hook(header) else None}


def state_tensors(model) -> dict:
    """Every tensor of a bitsandbytes or torch-dynamic model for safetensors (torchao models are written by ewq.hf in
    transformers' layout). bitsandbytes layers write their own state (int8 data + SCB;
    packed 4-bit data + quantization state); torch's dynamic int8 layers keep packed parameters that safetensors cannot
    hold, so they are stored as int8 data + scales and zero points (backends/torch_dynamic.saved_tensors)."""
    dynamic = {name + ".": m for name, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or any(name.startswith(p) for p in dynamic):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:  # tied weights (lm_head = embeddings) are stored once
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous()
    for prefix, m in dynamic.items():
        tensors.update(get_backend("torch-dynamic").saved_tensors(m, prefix))
    return tensors


def _int8_layer(state: dict, prefix: str, threshold: float):
    import bitsandbytes as bnb

    weight, scb = state[prefix + "weight"], state[prefix + "SCB"]
    bias = state.get(prefix + "bias")
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold,
                                device="meta")
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer.eval()


def _four_bit_layer(state: dict, prefix: str, dtype):
    import bitsandbytes as bnb

    stats = {k[len(prefix + "weight."):]: v for k, v in state.items() if k.startswith(prefix + "weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(state[prefix + "weight"], stats, requires_grad=False, device="cpu")
    out_f, in_f = weight.quant_state.shape
    bias = state.get(prefix + "bias")
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=dtype, quant_type=weight.quant_type,
                              compress_statistics=weight.compress_statistics, device="meta")
    layer.weight = weight
    weight.module, layer.quant_state = layer, weight.quant_state
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    layer.support_avx512bf16_for_cpu = False  # keep the saved layout (see apply.quantize_layer)
    return layer.eval()


def _torchao_layer(weights: dict, state: dict, prefix: str, dtype):
    weight = weights[prefix + "weight"]
    out_f, in_f = weight.shape
    bias = state.get(prefix + "bias")
    layer = torch.nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=dtype)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer.eval()


def check_fits(path, meta: dict, device: str, max_memory: dict | None) -> None:
    """A saved model loads whole (transformers cannot offload pre-quantized torchao weights, and its layers are already
    quantized: nothing of it may wait on disk): refuse one larger than --max-memory allows on the device."""
    if max_memory is None:
        return
    budget = memory_budget(device, max_memory)
    allowed = budget["cpu"] if device == "cpu" else budget[gpus_of(budget)[0]]  # (it loads whole, onto one device)
    if meta.get("weight_bytes", 0) > allowed:
        raise EWQError(f"{path} holds {meta['weight_bytes'] / 1e9:.2f} GB of weights, more than the {allowed / 1e9:.2f} "
                       f"GB --max-memory allows on {device}; a saved quantized model loads whole (none of it can wait "
                       f"on disk): allow more, or quantize the base model with a smaller plan")


def load_quantized(path, kind: str = "decoder") -> tuple:
    """(model on the CPU, plan, metadata) from a directory written by save_quantized."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    quiet_bitsandbytes()
    path = Path(path)
    meta = read_metadata(path)
    if not meta or meta.get("is_quantized") is not True or meta.get("method") not in BACKENDS:
        raise EWQError(f"{path} is not a quantized model saved by EWQ (metadata.json with is_quantized: true, "
                       f"method one of {', '.join(BACKENDS)})")
    backend = BACKENDS[meta["method"]]
    for needed in ("model.safetensors", "config.json", "plan.json"):
        if not (path / needed).is_file():
            raise EWQError(f"saved model {path} is incomplete: {needed} is missing; save it again with benchmark.py --save")
    plan = load_plan(path / "plan.json")
    if plan_hash(plan) != meta.get("plan_hash"):
        raise EWQError(f"{path}/plan.json is not the plan this model was saved with (hash {plan_hash(plan)}, metadata "
                       f"{meta.get('plan_hash')}); save the model again")
    headers = open_checkpoint(path)  # a truncated or corrupt file fails here, with a clear message
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            header = f.metadata() or {}
        if backend == "torchao":  # before any tensor is read: can this torchao rebuild what the file holds?
            hf_module(meta.get("torchao_version")).check_readable(path, header, meta.get("torchao_version"))
        state = load_file(path / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise EWQError(f"cannot read {path / 'model.safetensors'}: {e}; save the model again") from None
    if fingerprint_in_memory(headers, state) != meta.get("artifact_fingerprint"):
        raise EWQError(f"the tensors in {path} are not the ones that were saved (truncated, edited or from another "
                       f"plan); save the model again with benchmark.py --save")
    torchao_weights = {}
    if backend == "torchao":
        from torchao.prototype.safetensors.safetensors_support import (
            unflatten_tensor_state_dict,
        )

        try:
            rebuilt, state = unflatten_tensor_state_dict(state, header)
        except (ValueError, KeyError, TypeError) as e:
            raise EWQError(f"the torchao weights in {path} cannot be rebuilt ({str(e).splitlines()[0][:200]}); "
                           f"save the model again") from None
        # transformers' layout describes every tensor (plain ones as "Tensor"); older EWQ saves only torchao's
        torchao_weights = {k: v for k, v in rebuilt.items() if is_torchao_tensor(v)}
        state.update({k: v for k, v in rebuilt.items() if k not in torchao_weights})
    dtype = getattr(torch, meta["dtype"])
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(), no_init_weights():  # every weight is assigned from the file below
        model = model_class(kind).from_config(config, dtype=dtype)
    prefix = plan["model"]["block_prefix"]
    state_prefix = next((p for p in (prefix, f"transformer.{prefix}", f"model.{prefix}", prefix.partition(".")[2])
                         if any(k.startswith(p + ".") for k in state)), prefix)
    by_index = {b["index"]: b for b in plan["blocks"]}
    consumed, replacements = set(), []
    for i, block in enumerate(block_list(model, prefix)):
        for name, _ in quantizable_layers(block):
            precision = layer_precision(by_index[i], name)
            if precision == "raw":
                continue
            p = f"{state_prefix}.{i}.{name}."
            if backend == "torchao" and p + "weight" in state:
                continue  # a layer torchao's kernel could not take was kept raw (apply.Applied.kept_raw)
            try:
                if backend == "torchao":
                    layer = _torchao_layer(torchao_weights, state, p, dtype)
                elif precision == "4-bit":
                    layer = _four_bit_layer(state, p, dtype)
                elif backend == "torch-dynamic":
                    layer = get_backend("torch-dynamic").layer_from_saved(state, p, meta.get("act_bits", 7))
                else:
                    layer = _int8_layer(state, p, meta["int8_threshold"])
            except KeyError as e:
                raise EWQError(f"saved model {path} lacks tensor {e.args[0]}; it does not match its plan") from None
            replacements.append((block, name, layer))
            consumed |= {k for k in state if k.startswith(p)}
    # float tensors first (the skeleton's quantized-to-be layers simply get none), then the quantized layers
    model.load_state_dict({k: v for k, v in state.items() if k not in consumed}, strict=False, assign=True)
    for block, name, layer in replacements:
        block.set_submodule(name, layer)
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if isinstance(t, torch.Tensor) and t.device.type == "meta"]
    if missing:
        raise EWQError(f"saved model {path} lacks tensors {', '.join(missing[:3])}; save it again")
    return model.eval(), plan, meta
