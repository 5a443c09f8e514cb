"""torch's dynamic int8 post-training quantization (torch.ao.quantization.quantize_dynamic), the user's existing CPU
method: int8 weights, activations quantized per call with ONE scale per tensor (the whole batch), fp32 only.

Executor options (QuantSettings fields; benchmark.py --weight-scales / --act-bits / --outlier-channels):
  weight_scales     "tensor" (torch's default: one scale per matrix) | "channel" (one per output row, as ONNX Runtime's
                    per_channel=True: an outlier row no longer coarsens every other row's grid)
  act_bits          7 (torch's default: its dynamic Linear always asks fbgemm for reduce_range=True, activations on
                    0..127, because AVX2's u8 x s8 multiply-add saturates int16 pairs) | 8 (the full 0..255: half the
                    activation rounding error; exact only where the CPU accumulates u8 x s8 products in int32,
                    AVX512-VNNI / AVX-VNNI, which `check` proves with a probe before any work)
  outlier_channels  0 | 1..8: per matrix, up to this many input channels taken out of the int8 product and multiplied
                    in fp32 beside it, chosen on calibration sentences (ewq/outliers.py); needs `prepare`
With every option at its default a layer is exactly torch's quantize_dynamic layer, as before. Otherwise it is an
`Int8DynamicLinear` (a subclass of torch's dynamic Linear, so everything that recognises those still does): the same
fbgemm kernel with the activation range and weight scales the options say.
"""

import warnings

import torch
from torch import nn

from .. import outliers as outlier_channels
from ..common import EWQError
from . import as_linear

PRECISIONS = ("8-bit",)
COMPILES = False
COMPILE_NOTE = ("torch's dynamic int8 modules keep packed parameters (a TorchScript object) that torch.compile "
                "cannot trace; they run eager")
SAVE_METHOD = "dynamic-ptq-int8"
EXTRA_TENSORS = ("outlier_index", "outlier_weight")  # Int8DynamicLinear's buffers, saved as they are
WEIGHT_SCALES = ("tensor", "channel")
ACT_BITS = (7, 8)


def is_default(settings) -> bool:
    return settings.weight_scales == "tensor" and int(settings.act_bits) == 7 and not settings.outlier_channels


def key(settings) -> dict:
    """The options that change the numbers, for cache keys and result files; empty at the defaults (older keys stay
    valid)."""
    if is_default(settings):
        return {}
    return {"weight_scales": settings.weight_scales, "act_bits": int(settings.act_bits),
            "outlier_channels": int(settings.outlier_channels)}


def needs_calibration(settings) -> bool:
    """Whether `prepare` must see the float model run on calibration sentences before layers are quantized."""
    return bool(settings.outlier_channels)


def check(settings, dtype, device: str) -> None:
    if device != "cpu":
        raise EWQError("the torch-dynamic backend runs on the CPU only; pass --device cpu")
    if dtype != torch.float32:
        raise EWQError("the torch-dynamic backend runs in float32 only; pass --dtype float32")
    if settings.weight_scales not in WEIGHT_SCALES:
        raise EWQError(f"--weight-scales takes {' or '.join(WEIGHT_SCALES)}, got {settings.weight_scales!r}")
    if settings.act_bits not in ACT_BITS:
        raise EWQError(f"--act-bits takes 7 or 8, got {settings.act_bits!r}")
    outlier_channels.check_count(settings.outlier_channels)
    if settings.act_bits == 8:
        require_full_range("--act-bits 8")


def require_full_range(what: str) -> None:
    """Refuse 8-bit activations where the kernel is not exact with them."""
    error = full_range_error()
    if error > 0.01:
        raise EWQError(f"{what} is not exact on this CPU ({torch.backends.quantized.engine} engine, "
                       f"{torch.backends.cpu.get_cpu_capability()}): its int8 kernel saturates u8 x s8 products "
                       f"(a probe is off by {100 * error:.0f}%); it needs AVX512-VNNI or AVX-VNNI. Use --act-bits 7")


_FULL_RANGE_ERROR = {}


def full_range_error() -> float:
    """Relative error of the kernel with activations on the full 0..255 on a worst case (every activation 255, every
    weight 127, 384 inputs): ~0.4% where products accumulate in int32, ~50% where int16 pairs saturate (AVX2 without
    VNNI). Measured once per engine."""
    engine = torch.backends.quantized.engine
    if engine not in _FULL_RANGE_ERROR:
        x = torch.ones(4, 384)
        x[0, 0] = 0.0  # min 0, max 1: every other activation quantizes to 255
        w = torch.ones(8, 384)
        layer = _make_layer(w, None, per_channel=False, act_bits=8)
        with torch.no_grad():
            y, ref = layer(x)[1:], (x @ w.T)[1:]
        _FULL_RANGE_ERROR[engine] = float(((y - ref).abs() / ref.abs()).max())
    return _FULL_RANGE_ERROR[engine]


def cannot_save(precisions, device: str):
    return None


def unsupported(shape, precision: str, settings):
    return None


class Int8DynamicLinear(torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 Linear with EWQ's options: `act_bits` 8 asks the kernel for the full activation range
    (reduce_range=False); `outlier_index` ([k] int64) / `outlier_weight` ([k, out] fp32): those input channels are
    left out of the int8 product (their weight columns were zeroed before packing) and added in fp32. The weight (per
    tensor or per channel) is whatever was packed."""

    def __init__(self, in_features, out_features, bias_=True, act_bits: int = 7, outlier_index=None,
                 outlier_weight=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's quantized tensors are deprecated but still work in 2.13
            super().__init__(in_features, out_features, bias_=bias_, dtype=torch.qint8)
        self.act_bits = act_bits
        self.register_buffer("outlier_index", outlier_index)
        self.register_buffer("outlier_weight", outlier_weight)

    def forward(self, x):
        # zeroed in a copy, so the outliers no longer set the tensor's activation scale
        xq = x if self.outlier_index is None else x.index_fill(-1, self.outlier_index, 0.0)
        y = torch.ops.quantized.linear_dynamic(xq, self._packed_params._packed_params,
                                               reduce_range=self.act_bits == 7)
        if self.outlier_index is not None:
            y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]).index_select(1, self.outlier_index),
                                           self.outlier_weight)
        return y

    def _get_name(self):
        return "Int8DynamicLinear"

    def extra_repr(self):
        k = 0 if self.outlier_index is None else self.outlier_index.numel()
        return super().extra_repr() + f", act_bits={self.act_bits}, outlier_channels={k}"


def _quantized_weight(weight: torch.Tensor, per_channel: bool):
    """int8 weight as torch's own observers make it (symmetric): per tensor as quantize_dynamic does by default, per
    output row as its per_channel_dynamic_qconfig does."""
    from torch.ao.nn.quantized.modules.utils import _quantize_weight
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0) \
        if per_channel else MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    observer(weight)
    return _quantize_weight(weight.float(), observer)


def _make_layer(weight, bias, per_channel: bool, act_bits: int, outliers=None):
    """An Int8DynamicLinear computing x W^T + b, with the `outliers` input channels (indices or None) in fp32."""
    weight = weight.detach().float()
    out_f, in_f = weight.shape
    w8, outlier_weight = weight, None
    if outliers is not None:
        outliers = outliers.long().contiguous()
        w8 = weight.clone()
        w8[:, outliers] = 0.0  # out of the int8 product and of its weight scales ...
        outlier_weight = weight[:, outliers].T.contiguous()  # ... and into the fp32 one
    layer = Int8DynamicLinear(in_f, out_f, bias_=bias is not None, act_bits=act_bits, outlier_index=outliers,
                              outlier_weight=outlier_weight)
    layer.set_weight_bias(_quantized_weight(w8, per_channel),
                          None if bias is None else bias.detach().float().contiguous())
    return layer


def quantize_layer(module, precision: str, settings, dtype, device: str = "cpu"):
    if precision != "8-bit":
        raise EWQError(f"the torch-dynamic backend has no {precision}; use --backend torchao or bitsandbytes")
    outlier_channels.require_prepared(module, settings.outlier_channels)
    picked = outlier_channels.of(module)
    if is_default(settings) and picked is None:
        wrapper = nn.Sequential(as_linear(module, torch.float32))  # quantize_dynamic swaps children, not the root
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated but still works in 2.13
            torch.ao.quantization.quantize_dynamic(wrapper, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return wrapper[0]
    return _options_layer(module, settings, picked)


def _options_layer(module, settings, outliers=None):
    """An Int8DynamicLinear of a float Linear/Conv1D with the settings' weight scales and activation range."""
    lin = as_linear(module, torch.float32)
    return _make_layer(lin.weight, lin.bias, settings.weight_scales == "channel", int(settings.act_bits), outliers)


def prepare(model, layers: dict, batches, settings) -> dict | None:
    """The model-level hook, before any layer is quantized: with outlier_channels on, choose each float layer's
    outlier input channels on calibration `batches` (padded as served: embed.Embedder.tokenize) and attach them (ewq/outliers.py).
    `layers`: {"block.matrix": float layer} the plan quantizes. Returns what was chosen per matrix, or None when off."""
    if not needs_calibration(settings):
        return None
    return outlier_channels.prepare(model, layers, batches, lambda layer, picked: _options_layer(layer, settings, picked),
                                    int(settings.outlier_channels))


def state_bytes(module) -> int:
    packed = getattr(module, "_packed_params", None)
    if packed is None or not hasattr(packed, "_weight_bias"):
        return 0
    w, b = packed._weight_bias()
    scales = 16 if w.qscheme() == torch.per_tensor_affine else 16 * w.q_per_channel_scales().numel()
    # outlier channels are registered buffers, which apply's byte count (parameters only) does not see
    extra = sum(t.numel() * t.element_size() for t in (getattr(module, n, None) for n in EXTRA_TENSORS) if t is not None)
    return w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size()) + scales + extra


def saved_tensors(module, prefix: str) -> dict:
    """A dynamic int8 layer as plain tensors for safetensors: int8 `weight`, `weight_scale` (float64) and
    `weight_zero_point` (int64), one element per tensor or one per output row (per-channel), `bias`, and where present
    `outlier_index` (int64) and `outlier_weight` ([k, out], float32)."""
    w, b = module._packed_params._weight_bias()
    if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scale = torch.tensor([w.q_scale()], dtype=torch.float64)
        zero_point = torch.tensor([w.q_zero_point()], dtype=torch.int64)
    else:
        if w.q_per_channel_axis() != 0:
            raise EWQError(f"{prefix[:-1]} is quantized per channel along axis {w.q_per_channel_axis()}; EWQ saves "
                           f"per-row (axis 0) scales only")
        scale = w.q_per_channel_scales().to(torch.float64).contiguous()
        zero_point = w.q_per_channel_zero_points().to(torch.int64).contiguous()
    out = {prefix + "weight": w.int_repr().contiguous(), prefix + "weight_scale": scale,
           prefix + "weight_zero_point": zero_point}
    if b is not None:
        out[prefix + "bias"] = b.detach().contiguous()
    for name in EXTRA_TENSORS:
        t = getattr(module, name, None)
        if t is not None:
            out[prefix + name] = t.detach().contiguous()
    return out


def layer_from_saved(state: dict, prefix: str, act_bits: int = 7):
    """The layer `saved_tensors` wrote: torch's own dynamic Linear for a per-tensor layer without outlier channels at
    7-bit activations (what EWQ always saved before), an Int8DynamicLinear otherwise."""
    if int(act_bits) == 8:
        require_full_range("a model saved with --act-bits 8")
    weight = state[prefix + "weight"]
    out_f, in_f = weight.shape
    bias = state.get(prefix + "bias")
    scale, zero_point = state[prefix + "weight_scale"], state[prefix + "weight_zero_point"]
    extra = {name: state.get(prefix + name) for name in EXTRA_TENSORS}
    if scale.numel() == 1:
        qweight = torch._make_per_tensor_quantized_tensor(weight, float(scale[0]), int(zero_point[0]))
    else:
        if scale.numel() != out_f:
            raise EWQError(f"{prefix}weight_scale has {scale.numel()} scales for {out_f} rows; save the model again")
        qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero_point.long(), 0)
    if scale.numel() == 1 and int(act_bits) == 7 and all(t is None for t in extra.values()):
        layer = torch.ao.nn.quantized.dynamic.Linear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
    else:
        layer = Int8DynamicLinear(in_f, out_f, bias_=bias is not None, act_bits=int(act_bits), **extra)
    layer.set_weight_bias(qweight, None if bias is None else bias.float())
    return layer


def formats(settings) -> dict:
    if is_default(settings):
        return {"8-bit": "dynamic int8 (per-tensor weight scale, activations quantized per call)"}
    channel = settings.weight_scales == "channel"
    k = int(settings.outlier_channels)
    return {"8-bit": f"dynamic int8 ({'per-channel weight scales' if channel else 'per-tensor weight scale'}, "
                     f"activations quantized per call, one scale per tensor"
                     f"{', full 8-bit range' if int(settings.act_bits) == 8 else ''}"
                     f"{f', up to {k} outlier input channel' + ('s' if k > 1 else '') + ' per matrix in fp32' if k else ''})"}


def dequantize(module):
    return None  # activations are quantized per call: the fast sweep runs the layer itself
