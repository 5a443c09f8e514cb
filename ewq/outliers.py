"""Outlier input channels for executors that quantize activations with ONE scale per tensor (torch-dynamic).

A Linear whose input is quantized to int8 with one scale for the whole tensor loses its small input channels when one
channel is far above the rest: in MiniLM-L6 the FFN matrices see a few channels (driven by the [CLS] token) near 25
where the others stay under ~6, so those few set the scale and every other channel gets a quarter of the grid. Such a
channel is taken out of the int8 product and multiplied in fp32 beside it (LLM.int8()'s decomposition, with the
channels fixed once on calibration sentences instead of found per call):
    x W^T = x_rest W_rest^T (int8, channels zeroed) + x[:, idx] W[:, idx]^T (fp32, k columns)
exactly, in float. Which channels: the k largest |x_j| seen on calibration batches (padded as a service pads them).
How many, per matrix: each k in COUNTS up to the setting is tried on the matrix's own calibration inputs, and a larger
k is kept only where it divides the matrix's output error by GAIN (each channel costs a small fp32 product per call):
most matrices keep none.

(SmoothQuant-style smoothing, which moves the spread into the weights instead, was measured on MiniLM-L6 as well:
with per-channel weights and 8-bit activations outlier channels alone reached cosine 0.9976 / top-10 0.945, smoothing
alone 0.9962 / 0.928, both 0.9983 / 0.954 for 6x the preparation and as much code again, so it is not offered.)
`prepare` measures and attaches the chosen channels to the float layers; an executor's quantize_layer reads them
(`of`). Everything here is deterministic given the weights and the calibration batches.
"""

import torch

from .common import EWQError

COUNTS = (0, 1, 2, 4, 8)  # outlier channels a matrix may take out of its int8 product, up to the setting
GAIN = 2.0  # a larger count only where it at least halves the matrix's output error on calibration
ATTRIBUTE = "ewq_outlier_channels"


def _run(model, batches, masks: list):
    with torch.inference_mode():
        for batch in batches:
            masks[0] = batch.get("attention_mask")
            model(**batch)


def _tokens(t: torch.Tensor, mask) -> torch.Tensor:
    """[tokens, features] of the real (unpadded) tokens of a [batch, seq, features] activation."""
    if mask is not None and t.dim() == 3 and mask.shape == t.shape[:2]:
        return t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


def _hooked(model, layers: dict, batches, make_hook, pre: bool):
    masks, handles = [None], []
    try:
        for key, layer in layers.items():
            hook = make_hook(key, masks)
            handles.append(layer.register_forward_pre_hook(hook) if pre else layer.register_forward_hook(hook))
        _run(model, batches, masks)
    finally:
        for h in handles:
            h.remove()


def input_absmax(model, layers: dict, batches) -> dict:
    """{key: max |x_j| per input channel} of each layer in `layers` ({key: float Linear}) over the calibration batches
    (real tokens only: padding is not a channel's typical size)."""
    out = {}

    def make_hook(key, masks):
        def f(_, args):
            a = _tokens(args[0].detach(), masks[0]).abs().amax(0).float()
            out[key] = a if key not in out else torch.maximum(out[key], a)
        return f

    _hooked(model, layers, batches, make_hook, pre=True)
    missing = [k for k in layers if k not in out]
    if missing:
        raise EWQError(f"calibration never ran layer {missing[0]}; outlier channels need every quantized layer's inputs")
    return out


def choose(model, layers: dict, absmax: dict, batches, quantize, counts) -> dict:
    """{key: (channel indices or None, {k: relative error})}: each layer quantized alone by `quantize(float_layer,
    indices or None)` with its k largest channels out, for every k in `counts`, run on the layer's own float inputs;
    error = sum |y_q - y|^2 / sum |y|^2 over real tokens. A larger k wins only where its error * GAIN <= the kept one."""
    picks = {key: [None if k == 0 else absmax[key].topk(k).indices.sort().values for k in counts] for key in layers}
    built = {key: [quantize(layers[key], idx) for idx in picks[key]] for key in layers}
    err = {key: [0.0] * len(counts) for key in layers}
    ref = dict.fromkeys(layers, 0.0)

    def make_hook(key, masks):
        def f(_, args, y):
            ref[key] += _tokens(y, masks[0]).pow(2).sum(dtype=torch.float64).item()
            for i, q in enumerate(built[key]):
                err[key][i] += _tokens(q(args[0]) - y, masks[0]).pow(2).sum(dtype=torch.float64).item()
        return f

    _hooked(model, layers, batches, make_hook, pre=False)
    out = {}
    for key in layers:
        rel = [e / max(ref[key], 1e-30) for e in err[key]]
        best = 0
        for i in range(1, len(counts)):
            if rel[i] * GAIN <= rel[best]:
                best = i
        out[key] = (picks[key][best], {k: float(f"{r:.6g}") for k, r in zip(counts, rel)})
    return out


def prepare(model, layers: dict, batches, quantize, max_channels: int) -> dict:
    """Choose up to `max_channels` outlier input channels for each float layer of `layers` ({"block.matrix": layer})
    of `model` on calibration `batches`, and attach them to the layer (attribute ATTRIBUTE; `of` reads it). Returns
    {"block.matrix": {"outliers": [channel indices], "errors": {k: relative output error}}} for result files."""
    if not 0 <= max_channels <= max(COUNTS):
        raise EWQError(f"--outlier-channels takes 0 to {max(COUNTS)}, got {max_channels}")
    bad = [key for key, m in layers.items() if type(m) is not torch.nn.Linear]
    if bad:
        raise EWQError(f"outlier channels take float nn.Linear layers only; {bad[0]} is {type(layers[bad[0]]).__name__}")
    for layer in layers.values():
        if hasattr(layer, ATTRIBUTE):
            delattr(layer, ATTRIBUTE)  # a second prepare starts from the float layers as they are
    counts = tuple(k for k in COUNTS if k <= max_channels)
    if counts == (0,):
        return {}
    chosen = choose(model, layers, input_absmax(model, layers, batches), batches, quantize, counts)
    report = {}
    for key, (idx, errors) in chosen.items():
        setattr(layers[key], ATTRIBUTE, idx)  # None too: "prepared, no outliers" differs from "never prepared"
        report[key] = {"outliers": [] if idx is None else idx.tolist(), "errors": errors}
    return report


def prepared(layer) -> bool:
    return hasattr(layer, ATTRIBUTE)


def of(layer) -> torch.Tensor | None:
    """The outlier input channels `prepare` attached to a float layer, or None."""
    return getattr(layer, ATTRIBUTE, None)


def check_count(count) -> None:
    """An executor's outlier_channels setting: 0 to max(COUNTS), or one line saying so."""
    if not (isinstance(count, int) and 0 <= count <= max(COUNTS)):
        raise EWQError(f"--outlier-channels takes 0 to {max(COUNTS)}, got {count!r}")


def require_prepared(layer, count) -> None:
    """An executor with outlier channels on quantizes only layers `prepare` has seen."""
    if count and not prepared(layer):
        raise EWQError("--outlier-channels are chosen on calibration sentences before quantizing: run "
                       "apply.prepare_for_plan (load_for_plan does) before apply_plan")
