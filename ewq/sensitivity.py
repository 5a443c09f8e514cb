"""Measured sensitivity: the damage each block (or each matrix) does when it alone is quantized.

For every item (a block, or one matrix of a block) and for 8-bit and 4-bit separately: quantize that
item only (everything else raw), measure the damage on calibration text (decoders: mean KL(original ||
variant) per token on windows; encoders: mean 1 - cosine of sentence embeddings on sentences),
restore the item's float layers. The model is loaded once; at any moment only one item exists twice.
Sensitivity is measured with the backend that will run the plan (bitsandbytes' LLM.int8 and nf4 are not
torchao's weight-only int8 and HQQ int4), so the cache key holds the backend and its formats.
Calibration windows come from the end of the corpus and the evaluation windows of `--quality` from its
start, so a plan is never graded on its own calibration text. Results are cached per (weights
fingerprint, corpus, calibration, backend settings, granularity) and written after every item, so an
interrupted sweep resumes where it stopped; re-planning with another size target costs nothing.

Two ways to measure a decoder's items (`--sweep`):
  exact  one full forward over the calibration windows per item and precision: the KL itself;
  fast   (default) the same KL to second order, from one forward and a few backward passes: KL(p || q) ~
         1/2 dY' F dY, where dY is the change of the layer's output on the captured calibration inputs (the
         quantized layer run on them, minus the float one) and F the Fisher information of the model's output
         distribution with respect to that output, estimated from gradients of log p(y) at tokens y sampled from
         the model itself (E[g] = 0, E[g g'] = F). Output features (rows of the weight) are treated as independent,
         positions within a window are not. Each item then costs one small matmul instead of a forward pass.
Encoders are always measured exactly (their models are small).

`measure_plans` grades whole plans on the same windows, always with full forwards: the check that the summed
single-item damages predict the damage of the plan, and random plans of the same size as the floor any method
must beat.
"""

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from . import embed
from .apply import (
    block_list,
    load_model,
    matrix_shape,
    quantizable_layers,
    quantize_layer,
)
from .backends import QuantSettings, float_weight, get_backend
from .common import EWQError, write_json_atomic
from .device import pick_dtype
from .plan import fits
from .quality import compute_reference, evaluate, load_corpus, make_windows
from .source import load_tokenizer

CALIB_TOKENS = 512
CALIB_SENTENCES = embed.CALIB_SENTENCES  # encoders: calibration sentences from the end of the corpus
RANDOM_PLANS = 3
SWEEPS = ("fast", "exact")
FISHER_SAMPLES = 2  # sampled tokens per position for the Fisher estimate (each one backward pass; 2 and 4 rank
#                    SmolLM2's 210 matrices alike: Spearman 0.99)
# what "damage" means, by model kind; plans name their sensitivity fields after it (kl_4bit, cosine_loss_4bit)
METRICS = {"decoder": "kl", "encoder": "cosine_loss"}


def item_layers(blocks, item) -> list:
    """(block module, name, float layer) of the layers an item covers (block items only)."""
    block = blocks[item["block"]]
    layers = quantizable_layers(block)
    if item["matrix"] is not None:
        layers = [(n, m) for n, m in layers if n == item["matrix"]]
        if not layers:
            raise EWQError(f"block {item['block']} has no matrix '{item['matrix']}'")
    return [(block, n, m) for n, m in layers]


class CastIO(torch.nn.Module):
    """A quantized layer built in the dtype it runs in at benchmark time (bf16 on the CPU: torchao's int4 kernel is
    ~100x slower in fp32) inside the fp32 calibration model: inputs cast in, outputs cast back."""

    def __init__(self, layer, dtype):
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x):
        return self.layer(x.to(self.dtype)).to(x.dtype)


def quantized_layer(layer, precision: str, settings: QuantSettings, layer_dtype, dtype, device: str):
    q = quantize_layer(layer, precision, settings, layer_dtype, device)
    return q if layer_dtype == dtype else CastIO(q, layer_dtype)


@contextmanager
def quantized(model, blocks, assignments, settings: QuantSettings, dtype, device: str, layer_dtype=None, cache=None):
    """Temporarily replace layers: assignments is [(item, precision)]; every float layer is restored after.
    An item outside the blocks (the embeddings or head of a llama.cpp plan) has its weight's values replaced by
    their round trip through the format (tied weights change in both places, as in the file)."""
    backend = get_backend(settings.backend)
    swapped, replaced = [], []
    try:
        for item, precision in assignments:
            if precision == "raw":
                continue
            if item["block"] is None:
                weight = model.get_parameter(item["matrix"])
                replaced.append((weight, weight.data))
                weight.data = backend.round_trip(weight.data, precision, settings).to(weight.dtype)
                continue
            for block, name, layer in item_layers(blocks, item):
                if backend.unsupported(matrix_shape(layer), precision, settings):
                    continue  # kept raw, as apply_plan does
                if cache is not None:  # a Calibration: its layers, built once
                    q = cache.quantized_layer((item["block"], name), layer, precision)
                    q = q if cache.layer_dtype == dtype else CastIO(q, cache.layer_dtype)
                else:
                    q = quantized_layer(layer, precision, settings, layer_dtype or dtype, dtype, device)
                block.set_submodule(name, q)
                swapped.append((block, name, layer))
        yield
    finally:
        for block, name, layer in swapped:
            block.set_submodule(name, layer)
        for weight, data in replaced:
            weight.data = data


def sweep(calibration: "Calibration", items=None, done=None, save=None, progress: bool = True) -> list:
    """[{"8-bit": damage, "4-bit": damage}] per item (default: every block): calibration.score() with that item
    alone quantized; the model is restored afterwards. `done` holds rows measured earlier (resumed);
    `save(rows)` is called after every item."""
    c = calibration.load(progress)
    if items is None:
        items = [{"block": i, "matrix": None} for i in range(len(c.blocks))]
    rows = list(done or [])
    for item in tqdm(items[len(rows):], desc="sensitivity", initial=len(rows), total=len(items),
                     disable=not progress, leave=False):
        row = {}
        for precision in c.menu_of(item):
            with quantized(c.model, c.blocks, [(item, precision)], c.settings, c.dtype, c.device, c.layer_dtype, c):
                row[precision] = c.score()
        rows.append(row)
        if save:
            save(rows)
    return rows


def calibration_key(fingerprint: str, corpus, sample: dict, settings: QuantSettings, dtype, device: str,
                    granularity: str = "block", sweep_kind: str = "exact", layer_dtype=None) -> dict:
    """What the measured numbers depend on; `sample` says which text: {"windows", "window"} or {"sentences"}.
    Fields absent at their old values (exact sweep, layers in the model's dtype) keep older caches valid."""
    fast = {"sweep": "fast", "fisher_samples": FISHER_SAMPLES} if sweep_kind == "fast" else {}
    layers = {"layer_dtype": str(layer_dtype).replace("torch.", "")} if layer_dtype not in (None, dtype) else {}
    return {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256, **sample,
            "position": "end of corpus", "dtype": str(dtype).replace("torch.", ""), "device_type": device.split(":")[0],
            "granularity": granularity, **settings.key(), **fast, **layers}


class Calibration:
    """The float model, its calibration text and reference, loaded once for a sweep or plan checks.

    Decoders: token windows, damage = mean KL(original || variant) per token.
    Encoders: sentences, damage = mean (1 - cosine) between the original's and the variant's sentence embeddings."""

    def __init__(self, source, ckpt, fingerprint, calib_tokens, calib_text, window, settings, granularity, device,
                 calib_sentences: int = CALIB_SENTENCES, sweep_kind: str = "exact", menu=None):
        # fp32 on the CPU: the ranking needs accuracy, and fp32 prefill is several times faster there than bf16.
        # torchao's CUDA int4 runs in bf16 only.
        self.dtype = torch.float32 if device == "cpu" else (
            torch.bfloat16 if settings.backend == "torchao" else torch.float16)
        self.device, self.settings, self.ckpt, self.kind = device, settings, ckpt, ckpt.kind
        get_backend(settings.backend).check(settings, self.dtype, device)
        self.source = source
        corpus = load_corpus(calib_text)
        self.tokenizer = load_tokenizer(source.path)
        if self.kind == "encoder":
            self.sentences = embed.corpus_sentences(corpus, calib_sentences, from_end=True)
            self.embedder = embed.Embedder.of(source.path, ckpt.config, self.tokenizer)
            sample = {"sentences": len(self.sentences), "sentences_sha256": embed.sentences_digest(self.sentences),
                      "pooling": self.embedder.pooling.mode}
        else:
            self.windows = make_windows(self.tokenizer, corpus, calib_tokens, window, from_end=True)
            sample = {"windows": int(self.windows.shape[0]), "window": int(self.windows.shape[1])}
        self.metric = METRICS[self.kind]
        if sweep_kind not in SWEEPS:
            raise EWQError(f"unknown sweep '{sweep_kind}'; choose one of {', '.join(SWEEPS)}")
        self.sweep_kind = sweep_kind if self.kind == "decoder" else "exact"  # encoders: small, measured exactly
        self.menu = tuple(menu or get_backend(settings.backend).PRECISIONS)
        # quantized layers are built in the dtype the benchmark runs them in (the numbers then are the executor's)
        backend = get_backend(settings.backend)
        self.layer_dtype = getattr(backend, "LAYER_DTYPE", None) or pick_dtype(None, device, settings.backend, self.kind)
        self.key = calibration_key(fingerprint, corpus, sample, settings, self.dtype, device, granularity,
                                   self.sweep_kind, self.layer_dtype)
        self.model = self.reference = None
        self._quantized = {}

    def quantized_layer(self, key, layer, precision: str):
        """The layer quantized to `precision` in the run dtype, built once per sweep: the whole-plan checks reuse
        the sweep's layers instead of quantizing every matrix again (HQQ int4 takes ~0.1-0.5 s a matrix)."""
        if (key, precision) not in self._quantized:
            self._quantized[key, precision] = quantize_layer(layer, precision, self.settings, self.layer_dtype,
                                                             self.device)
        return self._quantized[key, precision]

    def menu_of(self, item) -> list:
        """The precisions an item is measured at: the menu's, where every matrix of the item can take them."""
        return [p for p in self.menu if all(fits(p, shape) for shape in item.get("shapes", []))]

    def _embed(self):
        return self.embedder.embed(self.model, self.sentences, self.device)

    def load(self, progress: bool):
        if self.model is None:
            self.model = load_model(self.source.path, self.dtype, self.kind)
            if self.device != "cpu":
                self.model.to(self.device)
            if self.kind == "encoder":
                self.reference = self._embed()
            else:
                self.reference = compute_reference(self.model, self.windows, self.device, progress=progress)
            self.blocks = block_list(self.model, self.ckpt.block_prefix)
        return self

    def score(self) -> float:
        """The damage the model's current state does (0 for the original)."""
        if self.kind == "encoder":
            return (1 - embed.cosine(self.reference, self._embed())).mean().item()
        return evaluate(self.model, self.reference, self.device, progress=False)["kl_mean"]


def measure(calibration: Calibration, items, cache_dir, progress: bool = True):
    """(per-item sensitivities, calibration key, cached?)."""
    key = calibration.key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / ".sensitivity" / f"sensitivity_{key['fingerprint'][:12]}_{digest}.json"
    done = []
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached["calibration"] == key:
                done = cached["items"] if "items" in cached else cached["blocks"]
                if len(done) == len(items):
                    return done, key, True
        except (ValueError, KeyError, TypeError):
            done = []  # a damaged cache entry is measured again and replaced
    start = time.perf_counter()

    def save(rows):  # after every item: Ctrl-C loses at most the item in progress
        write_json_atomic(path, {"schema_version": 2, "calibration": key, "items": rows, "complete": len(rows) == len(items),
                                 "seconds": round(time.perf_counter() - start, 1)})

    if calibration.sweep_kind == "fast":
        rows = fast_sweep(calibration, items, progress)
        save(rows)
    else:
        rows = sweep(calibration, items, done=done, save=save, progress=progress)
    return rows, key, False


def measure_plans(calibration: Calibration, items, plans, progress: bool = True) -> list:
    """The damage (calibration.metric) of each whole plan (a precision per item) on the calibration text."""
    calibration.load(progress)
    out = []
    for precisions in tqdm(plans, desc="whole-plan checks", disable=not progress, leave=False):
        with quantized(calibration.model, calibration.blocks, list(zip(items, precisions)), calibration.settings,
                       calibration.dtype, calibration.device, calibration.layer_dtype, calibration):
            out.append(calibration.score())
    return out


# ---- the fast sweep: every item from one forward and FISHER_SAMPLES backward passes ----

def capture_fisher(model, windows: torch.Tensor, layers: dict, samples: int = FISHER_SAMPLES, seed: int = 0,
                   progress: bool = False) -> dict:
    """For each named module in `layers`: its inputs on the calibration windows and, per sampled token set, the
    gradient of sum(log p(y)) with respect to its output, y drawn from the model's own distribution.
    Returns {name: {"x": [windows, T, in], "g": [samples, windows, T, out] (bfloat16: half the memory)}}.
    Only outputs need gradients: the parameters are frozen and the graph starts at the embeddings' output."""
    store = {name: {"x": [], "g": [[] for _ in range(samples)]} for name in layers}
    outputs, handles = {}, []
    embedding = model.get_input_embeddings()

    def forward_hook(name):
        def hook(module, args, output):
            if module is embedding:
                output = output.detach().requires_grad_()  # the root of the graph
            else:
                output.retain_grad()
            if name in store:
                store[name]["x"].append(args[0].detach())
                outputs[name] = output
            return output
        return hook

    hooked = dict(layers) if any(m is embedding for m in layers.values()) else {**layers, "_root": embedding}
    for name, module in hooked.items():
        handles.append(module.register_forward_hook(forward_hook(name)))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    try:
        # windows are independent sequences: a batch of them gives each its own gradients
        for window in tqdm(windows.split(4), desc="fisher capture", disable=not progress, leave=False):
            outputs.clear()
            with torch.enable_grad():
                logp = torch.log_softmax(model(window).logits[:, :-1].float(), dim=-1).flatten(0, 1)  # [W*T, V]
                probs = logp.detach().exp()
                for s in range(samples):
                    y = torch.multinomial(probs, 1, generator=generator)
                    for out in outputs.values():
                        out.grad = None
                    logp.gather(1, y).sum().backward(retain_graph=s + 1 < samples)
                    for name, out in outputs.items():
                        store[name]["g"][s].append(out.grad.detach().to(torch.bfloat16))
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {name: {"x": torch.cat(v["x"]), "g": torch.stack([torch.cat(g) for g in v["g"]])}
            for name, v in store.items()}


def fisher_kl(delta: torch.Tensor, grads: torch.Tensor, tokens: int) -> float:
    """1/2 dY' F dY per token, F estimated from sampled gradients: per window and output feature,
    mean over samples of (sum over positions of g * dY)^2. delta [W, T, out]; grads [S, W, T, out]."""
    dots = torch.einsum("swto,wto->swo", grads.float(), delta.float())
    return 0.5 * dots.pow(2).mean(0).sum().item() / tokens


def fast_sweep(calibration: "Calibration", items, progress: bool = True) -> list:
    """[{precision: estimated KL}] per item, from one capture of inputs and Fisher gradients (see the docstring)."""
    c = calibration.load(progress)
    backend = get_backend(c.settings.backend)
    names, layers = {}, {}
    for item in items:
        if item["block"] is None:
            continue
        for block, name, layer in item_layers(c.blocks, item):
            key = f"{item['block']}.{name}"
            names[(item["block"], name)], layers[key] = key, layer
    if any(it["block"] is None for it in items):
        layers["_embeddings"] = c.model.get_input_embeddings()
    captured = capture_fisher(c.model, c.windows, layers, samples=FISHER_SAMPLES, progress=progress)
    tokens = c.windows.shape[0] * (c.windows.shape[1] - 1)
    rows = []
    with torch.no_grad():
        for item in tqdm(items, desc="sensitivity (fast)", disable=not progress, leave=False):
            row = {}
            for precision in c.menu_of(item):
                if item["block"] is None:
                    row[precision] = other_kl(c, item, precision, captured, tokens)
                    continue
                total = 0.0
                for block, name, layer in item_layers(c.blocks, item):
                    if backend.unsupported(matrix_shape(layer), precision, c.settings):
                        continue
                    cap = captured[names[(item["block"], name)]]
                    q = c.quantized_layer((item["block"], name), layer, precision)
                    x, weight = cap["x"], backend.dequantize(q)
                    if weight is not None:  # weight-only: the output's change is x @ (W_q - W)^T, exactly, in fp32
                        delta = x.float() @ (weight - float_weight(layer)[0].float()).T
                    else:  # the layer quantizes its activations too: run it
                        delta = CastIO(q, c.layer_dtype)(x).float() - layer(x).float()
                    total += fisher_kl(delta, cap["g"], tokens)
                row[precision] = total
            rows.append(row)
    return rows


def other_kl(c: "Calibration", item, precision: str, captured: dict, tokens: int) -> float:
    """An embeddings/head item of a llama.cpp plan: the embedding path by the Fisher estimate at the embeddings'
    output; the output head (the same matrix when tied, or lm_head) by the exact KL of the head alone."""
    backend = get_backend(c.settings.backend)
    weight = c.model.get_parameter(item["matrix"])
    rounded = backend.round_trip(weight.data, precision, c.settings).float()
    total = 0.0
    embedding = c.model.get_input_embeddings()
    if embedding.weight is weight:
        cap = captured["_embeddings"]
        delta = rounded[cap["x"]] - weight.data.float()[cap["x"]]
        total += fisher_kl(delta, cap["g"], tokens)
    head = c.model.get_output_embeddings()
    if head is not None and head.weight is weight:
        total += head_kl(c, rounded)
    return total


def head_kl(c: "Calibration", rounded: torch.Tensor) -> float:
    """Mean KL(original || head with `rounded` weights) per token, on the final hidden states of the windows."""
    model = c.model
    if not hasattr(c, "_final_hidden"):
        hidden = []
        head = model.get_output_embeddings()
        handle = head.register_forward_hook(lambda m, args, out: hidden.append(args[0].detach()[:, :-1]))
        try:
            with torch.no_grad():
                for window in c.windows.split(4):
                    model(window)
        finally:
            handle.remove()
        c._final_hidden = torch.cat(hidden).float()
    h = c._final_hidden
    weight = model.get_output_embeddings().weight.float()
    total = 0.0
    for chunk in h.split(1):
        p = torch.log_softmax(chunk @ weight.T, dim=-1)
        q = torch.log_softmax(chunk @ rounded.T, dim=-1)
        total += (p.exp() * (p - q)).sum().item()
    return total / (h.shape[0] * h.shape[1])
