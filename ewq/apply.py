"""Stage 4: load the original checkpoint and apply a plan, layer by layer.

Every block Linear (and GPT-2 Conv1D) gets the precision its plan gives it: the block's `precision`,
or, in a per-matrix plan, the entry for that matrix in the block's `matrices`. The executor of 8-bit
and 4-bit layers is a backend (ewq/backends/: bitsandbytes, torchao, torch-dynamic), all behind one
interface. raw layers, embeddings, norms and lm_head stay in the run dtype.

Two ways in:
  * load_model + apply_plan: the float model on the CPU, then each replaced layer built from the float
    weight it replaces (at most one layer exists twice at any moment). Needs the whole float model in memory.
  * load_for_plan: the plan applied while loading, so the float model never exists whole: with torchao,
    transformers' own quantize-on-load (a TorchAoConfig made from the plan, see torchao_targets); otherwise
    (and where transformers' path cannot go) every block to quantize is first left on disk by accelerate, then
    read, quantized and placed one block at a time. With device_map="auto" and max_memory, raw blocks that do
    not fit stay on disk (plan_device_map).
"""

import contextlib
import ctypes
import gc
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .analysis import fingerprint as weights_fingerprint
from .backends import BACKENDS, GROUP_SIZES, QUANT_TYPES, QuantSettings, get_backend  # noqa: F401 (re-exported)
from .checkpoint import open_checkpoint
from .common import EWQError
from .plan import check_plan_matches, estimated_bytes, layer_precision, precisions_used


@dataclass
class Applied:
    seconds: float = 0.0
    kept_raw: list = field(default_factory=list)  # "block.matrix: why" for layers the backend's kernel cannot take
    prepared: dict | None = None  # what the backend's calibration step chose per matrix (prepare_for_plan), if any


def model_class(kind: str):
    """Decoders load with their LM head (generate); encoders as the bare encoder (AutoModel: no MLM/classifier
    head, whose weights an embedding model does not use; transformers drops them with a note)."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if kind == "encoder" else AutoModelForCausalLM


def load_model(path, dtype: torch.dtype, kind: str = "decoder"):
    """The original model on the CPU, safetensors only, no remote code."""
    return from_pretrained(path, dtype, kind, device_map="cpu")


def from_pretrained(path, dtype: torch.dtype, kind: str, **kwargs):
    """transformers' from_pretrained as EWQ always calls it: safetensors only, no remote code, quiet."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "some weights were not used" (an MLM head under AutoModel) is expected
    try:
        model = model_class(kind).from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                                  **kwargs)
    except (OSError, ValueError) as e:
        raise EWQError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from None
    return model.eval()


def empty_model(path, dtype: torch.dtype, kind: str = "decoder"):
    """The model's skeleton on the meta device, built from config.json alone (no weight is read): the class, module
    names and shapes from_pretrained will build, so what is computed on it (a TorchAoConfig, a device map) fits."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise EWQError(f"transformers cannot read {path}/config.json: {str(e).splitlines()[0]}") from None
    with init_empty_weights(), no_init_weights():
        return model_class(kind).from_config(config, dtype=dtype)


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


# ---- the plan applied while loading: the float model never exists whole ----

def open_for_plan(path, plan: dict, kind: str, progress: bool = True):
    """The checkpoint at `path`, refused in one line, before any weight is loaded, when it holds another kind of model
    or other weights than the plan was made for."""
    ckpt = open_checkpoint(path)
    if ckpt.kind != kind:
        raise EWQError(f"{path} holds {'an' if ckpt.kind == 'encoder' else 'a'} {ckpt.kind}, not "
                       f"{'an' if kind == 'encoder' else 'a'} {kind}")
    check_plan_matches(plan, weights_fingerprint(ckpt, progress=progress), len(ckpt.blocks), "the plan", kind)
    return ckpt


def plan_targets(model, plan: dict, settings: QuantSettings) -> tuple:
    """({"<module>.weight": precision}, kept_raw) for every layer of `model` (a skeleton, the float model or the model
    apply_plan quantized) that the plan quantizes and the settings' backend takes, named as in THIS model: what
    transformers' TorchAoConfig and accelerate's device maps match is the loaded model's names, not the checkpoint's
    (a BERT checkpoint saying `bert.encoder.layer.N` loads under AutoModel as `encoder.layer.N`). Keys name the
    weight, not the module: a module key makes transformers quantize the module's bias as well. kept_raw lists the
    layers apply_plan keeps in the run dtype (the same test, backend.unsupported), which are left out."""
    backend = get_backend(settings.backend)
    names = {id(m): n for n, m in model.named_modules()}
    targets, kept_raw = {}, []
    for index, _, name, layer, precision in plan_layers(model, plan, linear_layers):
        if precision == "raw":
            continue
        reason = backend.unsupported(matrix_shape(layer), precision, settings)
        if reason:
            kept_raw.append(f"block {index} {name}: {reason}")
            continue
        targets[f"{names[id(layer)]}.weight"] = precision
    return targets, kept_raw


def conv1d_layer(model, plan: dict):
    """(block index, matrix name) of the first GPT-2-style Conv1D layer ([in, out] weights) the plan quantizes, or
    None: transformers' torchao quantizer takes nn.Linear only, so such models go through EWQ's own loader."""
    return next(((index, name) for index, _, name, layer, precision in plan_layers(model, plan, linear_layers)
                 if precision != "raw" and type(layer) in _conv1d()), None)


def torchao_targets(model, plan: dict, settings: QuantSettings) -> tuple:
    """plan_targets for transformers' torchao quantizer (a TorchAoConfig), which refuses Conv1D layers."""
    conv = conv1d_layer(model, plan)
    if conv:
        raise EWQError(f"block {conv[0]} {conv[1]} is a GPT-2-style Conv1D layer ([in, out] weights): transformers' "
                       f"torchao quantizer takes nn.Linear only; this architecture runs through EWQ's own loader")
    return plan_targets(model, plan, settings)


def parse_max_memory(text, device: str) -> dict:
    """--max-memory: "8GB" (the run device; the first GPU on a GPU run) or "cuda:0=20GB,cuda:1=20GB,cpu=60GB" (or a
    dict as accelerate takes it, GPU indices as ints) -> {"cpu": bytes, "cuda:0": bytes, ...}; "cuda" means "cuda:0".
    Sizes as accelerate reads them: GB = 10^9, GiB = 2^30."""
    from accelerate.utils import convert_file_size_to_int

    if isinstance(text, dict):
        items = [(f"cuda:{k}" if isinstance(k, int) else str(k), v) for k, v in text.items()]
    else:
        items = [part.split("=", 1) if "=" in part else (device, part) for part in str(text).split(",") if part.strip()]
    out = {}
    for where, size in items:
        where = where.strip()
        where = "cuda:0" if where == "cuda" else where
        if where != "cpu" and not (where.startswith("cuda:") and where[5:].isdigit()):
            raise EWQError(f"--max-memory names '{where}'; use a size for the run device (8GB) or "
                           f"cpu=...,cuda:0=...,cuda:1=...")
        try:
            out[where] = int(size) if isinstance(size, (int, float)) else convert_file_size_to_int(str(size).strip())
        except ValueError:
            raise EWQError(f"--max-memory: '{size}' is not a size; write it like 8GB, 7.5GiB or 800MB") from None
    if not out:
        raise EWQError("--max-memory is empty; give a size like 8GB")
    return out


def memory_budget(device: str, max_memory: dict | None) -> dict:
    """Bytes that weights may take on each device of a run: the CPU, and on a GPU run every visible GPU ("cuda:0",
    "cuda:1", ...): --max-memory, else 90% of what is free now. A GPU the machine does not have is refused."""
    import psutil

    free = {"cpu": psutil.virtual_memory().available}
    if device == "cuda":
        free.update({f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())})
    unknown = sorted(set(max_memory or {}) - set(free))
    if unknown:
        raise EWQError(f"--max-memory names {', '.join(unknown)}, which this run does not have (it has "
                       f"{', '.join(free)}); run with --device cuda for GPUs, or drop those entries")
    budget = {k: int(0.9 * v) for k, v in free.items()}
    budget.update(max_memory or {})
    return budget


def gpus_of(budget: dict) -> list:
    """The GPUs of a budget, in index order."""
    return sorted((k for k in budget if k.startswith("cuda:")), key=lambda k: int(k[5:]))


def _map_keys(module: nn.Module, blocks: nn.ModuleList, prefix: str = ""):
    """Names covering every tensor outside the blocks, at the coarsest level that does not contain them."""
    for name, child in module.named_children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            yield from _map_keys(child, blocks, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"
    for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        yield f"{prefix}{name}"


def _tensor_bytes_after_loading(model, targets: dict, settings: QuantSettings, dtype) -> dict:
    """{tensor name: bytes it will hold once loaded}: the plan's estimate (scales included) for a weight it quantizes,
    the run dtype for other float tensors; tied tensors once."""
    bits = torch.finfo(dtype).bits
    sizes = {name: b.numel() * b.element_size() for name, b in model.named_buffers()}
    for name, p in model.named_parameters():
        sizes[name] = estimated_bytes(p.numel(), p.shape[0], targets[name], settings.group_size, bits) \
            if name in targets else p.numel() * (bits // 8 if p.is_floating_point() else p.element_size())
    return sizes


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"  # 3 digits: 0.152 vs 0.150


def plan_device_map(model, plan: dict, targets: dict, settings: QuantSettings, dtype, device: str,
                    max_memory: dict | None = None) -> dict:
    """EWQ's placement, as an accelerate device_map in `model`'s names (a skeleton from empty_model), for a model
    bigger than its device: everything outside the blocks (embeddings, norms, lm_head) on the first run device (the
    CPU, or the first GPU); then the blocks in order, filling the run devices (on a GPU run, GPU after GPU, as
    accelerate's "sequential" placement does); a raw block that fits no GPU goes to the CPU, then to disk, where
    accelerate reads it back from the checkpoint's own safetensors at each forward (nothing is copied). Quantized
    blocks never go to the CPU of a GPU run or to disk: transformers cannot offload torchao's quantized weights, and a
    block read back at every forward would have to be quantized again each time. max_memory None: all on `device`.
    Refuses, with the figures, when the quantized part does not fit the run devices."""
    blocks = block_list(model, plan["model"]["block_prefix"])
    blocks_name = next(n for n, m in model.named_modules() if m is blocks)
    keys_outside = list(_map_keys(model, blocks))
    if max_memory is None:
        return {**{key: device for key in keys_outside}, **{f"{blocks_name}.{i}": device for i in range(len(blocks))}}
    budget = memory_budget(device, max_memory)
    runs = gpus_of(budget) if device == "cuda" else ["cpu"]  # where quantized blocks may go, in order
    sizes = _tensor_bytes_after_loading(model, targets, settings, dtype)

    def size(key):
        return sum(v for name, v in sizes.items() if name == key or name.startswith(key + "."))

    quantized = {i for i in range(len(blocks)) if any(t.startswith(f"{blocks_name}.{i}.") for t in targets)}
    need = sum(map(size, keys_outside)) + sum(size(f"{blocks_name}.{i}") for i in quantized)
    allowed = sum(budget[d] for d in runs)
    where_text = runs[0] if len(runs) == 1 else f"{len(runs)} GPUs ({', '.join(runs)})"
    if need > allowed:
        raise EWQError(f"the quantized part of this model alone (everything outside the blocks and the {len(quantized)} "
                       f"blocks with quantized layers) needs {_size(need)} of weights, more than the {_size(allowed)} "
                       f"allowed on {where_text}; allow more with --max-memory, or choose a smaller plan (only raw "
                       f"blocks can wait on disk)")
    left = dict(budget)
    placed = {key: runs[0] for key in keys_outside}
    left[runs[0]] -= sum(map(size, keys_outside))
    current = 0  # first the quantized blocks, in order, filling the run devices one after the other
    for i in sorted(quantized):
        key = f"{blocks_name}.{i}"
        while current < len(runs) and size(key) > left[runs[current]]:
            current += 1
        if current == len(runs):
            raise EWQError(f"block {i} has quantized layers and fits none of {where_text} once the blocks before it "
                           f"are placed ({_size(size(key))}); allow more with --max-memory, or choose a smaller plan")
        placed[key] = runs[current]
        left[runs[current]] -= size(key)
    for i in sorted(set(range(len(blocks))) - quantized):  # then raw blocks where room is left: beside the block
        key = f"{blocks_name}.{i}"  # before them if they can, else any run device, the CPU (GPU runs), disk
        before = next((placed[f"{blocks_name}.{j}"] for j in range(i - 1, -1, -1) if j in quantized), runs[0])
        where = next((d for d in [before, *runs, *(["cpu"] if device == "cuda" else [])]
                      if size(key) <= left[d]), "disk")
        if where != "disk":
            left[where] -= size(key)
        placed[key] = where
    return {**{key: placed[key] for key in keys_outside},
            **{f"{blocks_name}.{i}": placed[f"{blocks_name}.{i}"] for i in range(len(blocks))}}


def load_for_plan(path, plan: dict, settings: QuantSettings, dtype: torch.dtype, kind: str = "decoder",
                  device: str = "cpu", device_map: str | None = None, max_memory=None, progress: bool = True) -> tuple:
    """(model, Applied): the checkpoint at `path` loaded with the plan applied while loading, so the float model never
    exists whole: peak memory is about the quantized weights plus one float block, not the float model.

    torchao: transformers' own quantize-on-load, from_pretrained(path, quantization_config=TorchAoConfig(FqnToConfig
    (torchao_targets))), layer by layer as tensors are read; its weights and logits are bit-identical to apply_plan's.
    bitsandbytes and torch-dynamic (and torchao for GPT-2-style Conv1D layers, or offloading on a machine without an
    accelerator, where transformers' torchao quantizer would move each CPU layer to "cuda" to quantize it): accelerate
    first leaves every block to quantize on disk (an index into the checkpoint's own safetensors; nothing is copied),
    then EWQ reads one block, quantizes its layers with the backend exactly as apply_plan does, and places it.

    device_map None: everything on `device`. "auto": plan_device_map's placement under max_memory (a dict
    {"cpu": bytes or "8GB", "cuda": ...} or the --max-memory text), raw blocks that do not fit waiting on disk; such a
    model cannot be moved with .to() afterwards. Applied.seconds is the whole call: quantizing happens inside loading.
    Settings whose backend calibrates on the whole float model first (torch-dynamic --outlier-channels, encoders:
    small) load it whole instead: load_model, prepare_for_plan, apply_plan."""
    check_backend(plan, settings, dtype, device)
    if device_map not in (None, "auto"):
        raise EWQError(f"device_map must be None or 'auto' (EWQ places the blocks itself), got {device_map!r}")
    if needs_calibration(settings):  # a model-level step: the whole float model runs calibration sentences
        if device_map is not None:
            raise EWQError("--outlier-channels are chosen by running the whole float model on calibration sentences; "
                           "drop --device-map/--max-memory (or the option)")
        return _load_calibrate_apply(path, plan, settings, dtype, kind, device, progress)
    budget = parse_max_memory(max_memory, device) if max_memory is not None else ({} if device_map else None)
    start = time.perf_counter()
    open_for_plan(path, plan, kind, progress)
    skeleton = empty_model(path, dtype, kind)
    targets, kept_raw = plan_targets(skeleton, plan, settings)  # (checks block count and matrix names)
    conv1d = conv1d_layer(skeleton, plan) is not None
    placement = plan_device_map(skeleton, plan, targets, settings, dtype, device, budget)
    offloaded = set(placement.values()) != {device}
    gpus = sorted({where for where in placement.values() if where.startswith("cuda:")})
    if len(gpus) > 1 and (settings.backend != "torchao" or conv1d):
        raise EWQError(f"this placement spreads the model over {len(gpus)} GPUs, which EWQ does through transformers' "
                       f"torchao quantizer only; use --backend torchao, or give --max-memory room for it on one GPU")
    blocks = block_list(skeleton, plan["model"]["block_prefix"])
    blocks_name = next(n for n, m in skeleton.named_modules() if m is blocks)
    del skeleton, blocks
    offload_dir = tempfile.mkdtemp(prefix="ewq-offload-")  # accelerate wants one; safetensors checkpoints leave it empty
    try:
        if settings.backend == "torchao" and not conv1d and not (offloaded and device == "cpu"):
            model = _load_quantizing(path, dtype, kind, settings, device, targets, placement if offloaded else device,
                                     offload_dir)
        else:
            model = _load_then_quantize_blocks(path, dtype, kind, settings, device, targets, placement, blocks_name,
                                               offload_dir, progress)
    except BaseException:
        shutil.rmtree(offload_dir, ignore_errors=True)
        raise
    if any(os.scandir(offload_dir)):  # tensors transformers had to convert were written there: keep them while needed
        weakref.finalize(model, shutil.rmtree, offload_dir, True)
    else:  # the usual case: offloaded tensors are read from the checkpoint's own files
        os.rmdir(offload_dir)
    return model, Applied(seconds=time.perf_counter() - start, kept_raw=kept_raw)


def needs_calibration(settings: QuantSettings) -> bool:
    """Whether the backend must run the float model on calibration inputs before quantizing (prepare_for_plan)."""
    return bool(getattr(get_backend(settings.backend), "needs_calibration", lambda _: False)(settings))


def prepare_for_plan(model, plan: dict, settings: QuantSettings, path, kind: str = "encoder") -> dict | None:
    """The backend's model-level step before apply_plan, where its settings need one (torch-dynamic's outlier
    channels): the float `model` is run on calibration sentences, the end of the default corpus (evaluation takes
    its start, so they never overlap), in padded batches of 32 as served. Returns what was chosen per matrix."""
    if not needs_calibration(settings):
        return None
    if kind != "encoder":
        raise EWQError("--outlier-channels are chosen on calibration sentences: encoders only (drop it for decoders)")
    from . import embed, quality  # (the encoder suite and the corpus: only this step needs them)
    from .source import load_tokenizer

    embedder = embed.Embedder.of(path, open_checkpoint(path).config, load_tokenizer(path))
    sentences = embed.corpus_sentences(quality.load_corpus(), embed.CALIB_SENTENCES, from_end=True)
    batches = [embedder.tokenize(sentences[i:i + 32]) for i in range(0, len(sentences), 32)]  # batches of 32, as served
    layers = {f"{index}.{name}": layer for index, _, name, layer, precision in plan_layers(model, plan)
              if precision != "raw"}
    return get_backend(settings.backend).prepare(model, layers, batches, settings)


def _load_calibrate_apply(path, plan: dict, settings: QuantSettings, dtype, kind: str, device: str,
                          progress: bool) -> tuple:
    """load_for_plan for settings that calibrate on the whole float model: loaded whole (encoders, small), prepared,
    then quantized in place."""
    start = time.perf_counter()
    open_for_plan(path, plan, kind, progress)
    if kind != "encoder":
        raise EWQError("--outlier-channels are chosen on calibration sentences: encoders only (drop it for decoders)")
    model = load_model(path, dtype, kind)
    prepared = prepare_for_plan(model, plan, settings, path, kind)
    applied = apply_plan(model, plan, settings, dtype, progress=progress, device=device)
    model.to(device)
    return model, Applied(seconds=time.perf_counter() - start, kept_raw=applied.kept_raw, prepared=prepared)


def _load_quantizing(path, dtype, kind, settings, device, targets: dict, device_map, offload_dir):
    """transformers' quantize-on-load with the plan as a TorchAoConfig; checks that every target came out quantized
    (transformers skips, silently, a FqnToConfig key that names no weight of the model)."""
    from transformers import TorchAoConfig

    config = TorchAoConfig(quant_type=get_backend("torchao").fqn_config(targets, settings, device)) if targets else None
    with _heap_trimmed():
        model = from_pretrained(path, dtype, kind, device_map=device_map, quantization_config=config,
                                offload_folder=offload_dir)
    missed = [fqn for fqn in targets if not is_tensor_subclass(model.get_parameter(fqn))]
    if missed:
        raise EWQError(f"transformers left {len(missed)} planned layers unquantized ({missed[0]}, ...); "
                       f"the plan does not fit this model's layers")
    return model


def _load_then_quantize_blocks(path, dtype, kind, settings, device, targets: dict, placement: dict, blocks_name: str,
                               offload_dir, progress: bool):
    """Every block with a layer to quantize is loaded "on disk" (accelerate keeps an index into the checkpoint's
    safetensors, the tensors stay there), then, one block at a time: its tensors are read into the block (on the CPU,
    in the run dtype), its planned layers replaced by the backend's quantized layers, and the block moved to `device`.
    When no block is left on disk, accelerate's hooks are removed: the model is an ordinary one."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    backend = get_backend(settings.backend)
    todo = sorted({int(t[len(blocks_name) + 1:].split(".", 1)[0]) for t in targets})
    device_map = {**placement, **{f"{blocks_name}.{i}": "disk" for i in todo}}
    quiet = logging.getLogger("accelerate.big_modeling")  # "some parameters are on the meta device": ours, on purpose
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = from_pretrained(path, dtype, kind, device_map=device_map, offload_folder=offload_dir)
    finally:
        quiet.setLevel(level)
    for i in tqdm(todo, desc="quantizing blocks", disable=not progress, leave=False):
        name = f"{blocks_name}.{i}"
        block = model.get_submodule(name)
        # each offloaded submodule's hook holds the map to its tensors on disk (named without the module's prefix)
        held = [(m, m._hf_hook.weights_map) for m in block.modules()
                if getattr(getattr(m, "_hf_hook", None), "weights_map", None) is not None]
        remove_hook_from_module(block, recurse=True)
        for module, weights in held:
            for tensor_name, _ in list(module.named_parameters(recurse=False)):
                set_module_tensor_to_device(module, tensor_name, "cpu", value=weights[tensor_name])
        freed = module_bytes(block)  # the float weights, let go once the planned layers are replaced
        for layer_name, layer in quantizable_layers(block):
            precision = targets.get(f"{name}.{layer_name}.weight")
            if precision:
                block.set_submodule(layer_name, backend.quantize_layer(layer, precision, settings, dtype, device))
        target = placement.get(name, device)
        block.to(target)
        model.hf_device_map[name] = target
        del held, layer, block
        release_freed_memory(freed)
    if len(set(model.hf_device_map.values())) == 1 and "disk" not in model.hf_device_map.values():
        remove_hook_from_module(model, recurse=True)  # nothing offloaded any more: no per-forward hooks
        del model.hf_device_map
    return model


def _malloc_trim():
    """glibc's malloc_trim (give freed heap back to the OS), or None where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _heap_trimmed(every_s: float = 0.25):
    """While transformers loads and quantizes tensor after tensor in its own loop (where EWQ cannot step in between
    layers), give the freed heap back to the OS every `every_s` seconds from a helper thread (malloc_trim takes the
    allocator's locks: safe beside the loading thread). Without it the process keeps, as glibc's heap, the float
    tensors and quantization temporaries it freed (torchao's HQQ int4 needs about 36x a matrix's bf16 size while it
    runs): measured on a 1.1B Llama, int8, peak anonymous memory 1.88 -> 1.54 GiB."""
    trim, done = _malloc_trim(), threading.Event()

    def keep_trimming():
        while not done.wait(every_s):
            trim(0)

    helper = threading.Thread(target=keep_trimming, daemon=True)
    if trim:
        helper.start()
    try:
        yield
    finally:
        done.set()
        if trim:
            helper.join()


# Below this many bytes freed since the last collection, release_freed_memory waits: one pass of the cycle collector
# takes 0.1-0.2 s in a process holding torch and transformers, more than a small block's memory is worth (a tiny or
# 135M model's blocks: 0.01-14 MB). A 1B+ model's blocks (40 MB and up) are collected every time, as before.
COLLECT_AFTER_BYTES = 32 << 20
_freed_since_collect = 0


def release_freed_memory(freed_bytes: int | None = None) -> None:
    """Free the float block just replaced, and give its memory back to the OS. Its layers sit in reference cycles
    (accelerate's hooks set `module.forward` to a method bound to the module itself, and removing them leaves such an
    attribute), which only the cycle collector frees: without gc.collect the float weights of every block stay alive
    until it happens to run. And glibc serves allocations below its mmap threshold (which rises, after the first large
    free, up to 32 MB: most weight matrices) from the heap and keeps what is freed there.
    freed_bytes: about how much was let go; the collection waits until COLLECT_AFTER_BYTES have been (None: now)."""
    global _freed_since_collect
    if freed_bytes is not None:
        _freed_since_collect += freed_bytes
        if _freed_since_collect < COLLECT_AFTER_BYTES:
            return
    _freed_since_collect = 0
    gc.collect()
    trim = _malloc_trim()
    if trim:
        trim(0)


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


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (tensor subclasses counted by the tensors inside them)."""
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


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
                # (a block left on disk by --max-memory holds meta tensors: all at address 0, so each counts by id)
                key = id(t) if is_tensor_subclass(t) or t.is_meta else (t.data_ptr(), t.numel())
                if t.numel() and key not in seen_tensors:
                    seen_tensors.add(key)
                    groups[group] += tensor_bytes(t)
            groups[group] += layer_state_bytes(m)

    if plan:
        for _, _, _, layer, precision in plan_layers(model, plan, linear_layers):
            count(layer.modules(), "raw" if is_float_layer(layer) else precision)
    count(model.modules(), "other")  # what is left: embeddings, norms, lm_head
    return groups
