"""EWQ models in transformers' own form, and the one import that lets plain transformers read EWQ's CPU int4.

What leaves the tool through here:
  * a plan as transformers' `quantization_config` (TorchAoConfig over torchao's FqnToConfig, one entry per quantized
    weight, in the loaded model's names): `from_pretrained(base, quantization_config=...)` quantizes while loading,
    bit-identical to EWQ's apply_plan with the torchao backend (write_hf_config, quantization_config);
  * a quantized model's tensors in transformers' torchao layout, as `save_pretrained` writes a TorchAoConfig model
    (torchao's flatten_tensor_state_dict + its header metadata), so `from_pretrained(saved_dir)` loads an EWQ save
    without EWQ (hf_tensors, saved_config; ewq.artifact writes the directory);
  * CPU int4 weights in a portable form, and the registration that reads them back.

CPU int4 (torchao's Int4OpaqueTensor, the CPU tinygemm kernel) keeps its nibbles in a layout torch chooses for the
running CPU: AVX-512, AVX2 and plain builds pack differently, and bytes moved from one to another give wrong logits
without any error. torchao's safetensors support has no form for it at all. EWQ stores such a weight as
`EwqInt4CpuTensor`: the codes unpacked (two per byte, low nibble first, [out, in / 2] uint8) and tinygemm's
scale_and_zero as it is (plain bf16/fp16/fp32, no machine-dependent layout); loading packs the codes again with torch's
own packing op for the loading CPU. Reading it, and parsing PrototypeInt4WeightOnlyConfig out of a config.json or a
quantization_config JSON (torchao's config_from_dict refuses classes outside its allow-list: "Failed to find class
PrototypeInt4WeightOnlyConfig in any of the allowed modules"), needs this module imported once, before from_pretrained.
It only adds entries to torchao's allow-lists: no remote code, no pickle.

    import ewq.hf  # noqa: F401  (registers EWQ's CPU int4 form with torchao)
    model = AutoModelForCausalLM.from_pretrained("quantized_models/<name>-<hash>")

Int8 weights (and CUDA int4) are torchao's own allow-listed classes: those models load with plain transformers.
"""

import copy
import functools
import json
from pathlib import Path

import torch
import torchao
import torchao.core.config as torchao_config
import torchao.prototype.safetensors.safetensors_utils as torchao_safetensors
from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
from torchao.utils import TorchAOBaseTensor

from .apply import check_backend, empty_model, linear_layers, open_for_plan, plan_layers, torchao_targets
from .backends import QuantSettings, get_backend
from .checkpoint import CONV1D_MODEL_TYPES
from .common import EWQError, write_json_atomic
from .plan import group_size_of, int8_activations_of

INT4_CPU = "EwqInt4CpuTensor"  # the `_type` of a portable CPU int4 weight in a file's header: never rename it
_ROWS = 256  # rows unpacked at a time: whole packing blocks (torch packs 64 rows at a time with AVX-512, 32 otherwise)


# ---- CPU int4: torch's packing, learned on the running machine ----

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (0..15) [out, in] -> the bytes torch's CPU int4 kernel reads on THIS machine (what
    Int4OpaqueTensor.from_hp stores as qdata)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)  # (low, high) of each byte, in byte order


@functools.lru_cache(maxsize=16)
def _positions(rows: int, cols: int) -> torch.Tensor:
    """For each nibble of pack_int4 of a [rows, cols] matrix, the flat index (row * cols + col) of the code it holds.
    Learned by packing probe matrices whose codes spell out 4 bits of each element's row or column index, so no
    instruction set's layout is assumed: whatever torch does on this machine is what gets undone."""
    row = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    col = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    index = torch.zeros(rows * cols, dtype=torch.int64)
    for grid, size, stride in ((row, rows, cols), (col, cols, 1)):
        for shift in range(0, max(size - 1, 1).bit_length(), 4):
            index += (_nibbles(pack_int4((grid >> shift) & 0xF)).to(torch.int64) << shift) * stride
    return index


def unpack_int4(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The codes [rows, cols] (uint8) of a matrix pack_int4 packed on this machine."""
    packed = packed.contiguous().view(torch.uint8).reshape(rows, cols // 2)
    out = torch.empty(rows, cols, dtype=torch.uint8)
    for start in range(0, rows, _ROWS):
        n = min(_ROWS, rows - start)
        chunk = torch.empty(n * cols, dtype=torch.uint8)
        chunk[_positions(n, cols)] = _nibbles(packed[start:start + n])
        out[start:start + n] = chunk.view(n, cols)
    return out


class EwqInt4CpuTensor(TorchAOBaseTensor):
    """A CPU int4 weight as it is stored: codes two per byte, low nibble first ([out, in / 2] uint8), and tinygemm's
    scale_and_zero ([in / group, out, 2], the run dtype). It exists to be flattened into a safetensors file by torchao
    (its class name is the `_type` in the header); loading turns it straight back into an Int4OpaqueTensor packed for
    the loading CPU (_repack), so it never runs a matmul."""

    tensor_data_names = ["qdata", "scale_and_zero"]
    tensor_attribute_names = ["block_size", "shape"]

    def __new__(cls, qdata, scale_and_zero, block_size, shape):
        return torch.Tensor._make_wrapper_subclass(cls, shape, device=qdata.device, dtype=scale_and_zero.dtype)

    def __init__(self, qdata, scale_and_zero, block_size, shape):
        self.qdata, self.scale_and_zero, self.block_size = qdata, scale_and_zero, block_size

    @classmethod
    def from_opaque(cls, weight: Int4OpaqueTensor, name: str = "a weight") -> "EwqInt4CpuTensor":
        if any(getattr(weight, a, None) is not None for a in ("act_mapping_type", "act_pre_scale", "qzeros")):
            raise EWQError(f"{name} is torchao CPU int4 with int8 activations or an activation scale; only EWQ's "
                           f"weight-only int4 has a portable form")
        rows, cols = weight.shape
        codes = unpack_int4(weight.qdata, rows, cols)
        if not torch.equal(pack_int4(codes), weight.qdata):  # the learned layout must give the very same bytes back
            raise EWQError(f"cannot read torch's CPU int4 packing of {name} on this machine "
                           f"({torch.backends.cpu.get_cpu_capability()}); nothing was saved")
        plain = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        return cls(plain, weight.scale_and_zero.detach(), list(weight.block_size), list(weight.shape))


def _repack(qdata, scale_and_zero, block_size, shape) -> Int4OpaqueTensor:
    """What torchao's object_from_dict builds from an EwqInt4CpuTensor record: an Int4OpaqueTensor packed for this
    CPU, exactly as Int4OpaqueTensor.from_hp would have packed the same codes here."""
    codes = torch.stack([qdata & 0xF, qdata >> 4], dim=2).reshape(qdata.shape[0], -1)
    return Int4OpaqueTensor(qdata=pack_int4(codes), scale_and_zero=scale_and_zero, block_size=list(block_size),
                            shape=torch.Size(shape))


def register() -> None:
    """Let torchao (and so transformers) read what EWQ writes: the EwqInt4CpuTensor record in a safetensors header, and
    PrototypeInt4WeightOnlyConfig in a quantization_config. Idempotent; runs when this module is imported."""
    torchao_config.ALLOWED_AO_MODULES.add(PrototypeInt4WeightOnlyConfig.__module__)
    torchao_safetensors.ALLOWED_CLASSES[INT4_CPU] = _repack
    # safetensors_support imported this list object by name: extend it in place, never rebind it
    if INT4_CPU not in torchao_safetensors.ALLOWED_TENSORS_SUBCLASSES:
        torchao_safetensors.ALLOWED_TENSORS_SUBCLASSES.append(INT4_CPU)


register()


# ---- a plan as transformers' quantization_config ----

def quantization_config(plan: dict, settings, kind: str, base=None, device: str = "cpu") -> dict:
    """The plan as the `quantization_config` dict transformers understands, TorchAoConfig(FqnToConfig({"<loaded-model
    module>.weight": config})).to_dict(): one entry per layer the plan quantizes (the torchao configs
    backends/ao.py uses, with these settings: group size, int8 activations), raw layers and layers torchao's kernel
    cannot take absent, no "_default". Names are the model's as AutoModelForCausalLM (decoder) or AutoModel (encoder)
    loads it from `base` (default: the plan's model path), read from config.json alone. Refuses a base whose weights
    are not the plan's (fingerprint) and names the plan gives that the model lacks. With CPU int4 layers
    (PrototypeInt4WeightOnlyConfig) the dict parses only where `import ewq.hf` ran first (see the module docstring)."""
    from transformers import TorchAoConfig

    base = Path(base or plan["model"]["path"])
    open_for_plan(base, plan, kind, progress=False)
    check_backend(plan, settings, torch.bfloat16, device)  # llama.cpp types, a group size torchao lacks: refused
    skeleton = empty_model(base, torch.bfloat16, kind)  # names and shapes only: the dtype changes neither
    targets, _ = torchao_targets(skeleton, plan, settings)
    return TorchAoConfig(quant_type=get_backend("torchao").fqn_config(targets, settings, device)).to_dict()


def write_hf_config(plan: dict, settings, kind: str, path, base=None, device: str = "cpu") -> Path:
    """Write quantization_config(plan, settings, kind, base, device) as JSON to `path` (atomically; nothing is written
    when it is refused). Use it without EWQ:
        quantization_config=TorchAoConfig.from_dict(json.load(open(path)))
        AutoModelForCausalLM.from_pretrained(base, quantization_config=..., dtype=torch.bfloat16, device_map="cpu")
    (with CPU int4 layers, after `import ewq.hf`; device="cuda" writes CUDA's int4 config, bfloat16). Returns the path."""
    return write_json_atomic(path, quantization_config(plan, settings, kind, base, device))


def write_plan_hf_config(plan: dict, plan_path, device: str = "cpu") -> Path:
    """main_cache_model.py --write-hf-config: the plan's quantization_config beside it, <plan>.quantization_config.json,
    with the settings the plan was measured with (torchao group size, int8 activations)."""
    settings = QuantSettings(backend="torchao", group_size=group_size_of(plan),
                             int8_activations=int8_activations_of(plan))
    plan_path = Path(plan_path)
    return write_hf_config(plan, settings, plan["model"].get("kind", "decoder"),
                           plan_path.with_name(f"{plan_path.stem}.quantization_config.json"), device=device)


# ---- a quantized model in transformers' torchao layout ----

def hf_form(model) -> bool:
    """Whether plain transformers can load this architecture's torchao weights: not for GPT-2-style Conv1D models,
    whose layers apply_plan turned into nn.Linear but transformers builds as Conv1D ([in, out] weights)."""
    return model.config.model_type not in CONV1D_MODEL_TYPES


def hf_tensors(model) -> tuple:
    """(tensors, header metadata) of a model.safetensors in transformers' torchao layout, what save_pretrained writes
    for a model loaded with a TorchAoConfig: torchao's flatten_tensor_state_dict over the whole state dict (a quantized
    weight becomes `<module>._weight_<part>` tensors, its type and attributes in the header; every other tensor keeps
    its name, typed "Tensor"), tied tensors dropped (their header entries stay, as save_pretrained leaves them),
    transformers' weight renamings reverted, "format": "pt". CPU int4 weights are stored as EwqInt4CpuTensor."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {}
    for name, t in model.state_dict().items():
        if isinstance(t, Int4OpaqueTensor):
            t = EwqInt4CpuTensor.from_opaque(t, name)
        elif type(t) is torch.nn.Parameter:
            t = t.detach()
        state[name] = t
    for name in model._keys_to_ignore_on_save or ():
        state.pop(name, None)
    tensors, header = flatten_tensor_state_dict(state)
    tensors = remove_tied_weights_from_state_dict(tensors, model)
    tensors = revert_weight_conversion(model, tensors)
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, {**header, "format": "pt"}


def saved_config(model, plan: dict, settings, dtype):
    """A copy of the model's config as save_pretrained writes it (dtype, architectures) with the quantization_config
    of the layers that really are torchao weights (a layer kept raw is absent), in the model's own names."""
    from transformers import TorchAoConfig

    config = copy.deepcopy(model.config)
    config.dtype = str(dtype).replace("torch.", "")
    config.architectures = [type(model).__name__]
    if hf_form(model):
        names = {id(m): n for n, m in model.named_modules()}
        targets = {f"{names[id(layer)]}.weight": precision
                   for _, _, _, layer, precision in plan_layers(model, plan, linear_layers)
                   if precision != "raw" and type(layer.weight).__module__.startswith("torchao.")}
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        device = next((w.device.type for w in weights if type(w).__module__.startswith("torchao.")), "cpu")
        config.quantization_config = TorchAoConfig(
            quant_type=get_backend("torchao").fqn_config(targets, settings, device)).to_dict()
    return config


def needs_hook(header: dict) -> bool:
    """Whether a saved file holds weights only `import ewq.hf` lets torchao read."""
    return any(json.loads(header[n]).get("_type") == INT4_CPU for n in json.loads(header.get("tensor_names", "[]")))


def check_readable(path, header: dict, saved_with: str | None = None) -> None:
    """Refuse, before any tensor is read, a saved directory this torchao cannot rebuild: a weight type outside its
    allow-list (an older torchao, or a newer format), or a quantization_config it cannot parse."""
    from transformers import TorchAoConfig

    path = Path(path)
    try:
        names = json.loads(header.get("tensor_names", "[]"))
        types = {json.loads(header[n]).get("_type") for n in names}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EWQError(f"the torchao description in {path / 'model.safetensors'} is damaged ({e}); save the model "
                       f"again") from None
    unknown = sorted(t for t in types - {"Tensor"} if t not in torchao_safetensors.ALLOWED_TENSORS_SUBCLASSES)
    fix = (f"install torchao=={saved_with} (it was saved with that) or save the model again with this one"
           if saved_with else "save the model again with this torchao")
    if unknown:
        raise EWQError(f"torchao {torchao.__version__} cannot rebuild the {', '.join(unknown)} weights in {path}; {fix}")
    try:
        config = json.loads((path / "config.json").read_text()).get("quantization_config")
        if config:
            TorchAoConfig.from_dict(config)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise EWQError(f"torchao {torchao.__version__} cannot read the quantization_config in {path / 'config.json'} "
                       f"({str(e).splitlines()[0][:160]}); {fix}") from None
