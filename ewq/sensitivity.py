"""Measured sensitivity: the damage each block (or each matrix) does when it alone is quantized.

For every item (a block, or one matrix of a block) and every format of the menu: quantize that item only (everything
else raw), measure the damage on calibration text (decoders: mean KL(original || variant) per token on windows;
encoders: mean 1 - cosine of sentence embeddings on sentences). Sensitivity is measured with the backend that will
run the plan (bitsandbytes' LLM.int8 and nf4 are not torchao's weight-only int8 and HQQ int4), so the cache key holds
the backend and its formats. Calibration windows come from the end of the corpus and the evaluation windows of
`--quality` from its start, so a plan is never graded on its own calibration text. Results are cached per (weights
fingerprint, corpus, calibration, backend settings, granularity); re-planning with another size target costs nothing.

The model is never whole (stream.StreamedModel): blocks are read from the memory-mapped checkpoint one at a time,
so memory is one float block, the calibration state and what is quantized now, whatever the model's size:
  * one streamed forward pass keeps the hidden states entering every block (windows x tokens x hidden, small beside
    a block) and the original's output (the reference: top-k log-probs, or sentence embeddings);
  * a block's damage is then measured from its own input: the item's block runs quantized on the stored input, the
    blocks after it float, and the model's own head scores the result.

Two ways to measure a decoder's items (`--sweep`):
  exact  the KL itself: per item and format, the stored input through the quantized block and every later block;
  fast   (default) the same KL to second order, KL(p || q) ~ 1/2 dY' F dY, with dY the change of an output caused by
         the item (a matrix item: its layer's output, x @ (W_q - W)^T on the layer's captured inputs; a block item: the
         block's output, the whole block quantized, so effects between its matrices count) and F the Fisher
         information of the model's output distribution with respect to that output, estimated from gradients g of
         log p(y) at tokens y sampled from the model itself (E[g] = 0, E[g g'] = F). Output features are treated as
         independent, positions within a window are not. The gradients are computed faithfully block by block,
         backwards: the gradient at the final hidden states comes from the head; each block is then run again with
         autograd on its stored input, and the chain rule through it gives the gradient at its input (passed on to
         the block before) and at each of its layers' outputs, which, with the layer inputs captured in the same run,
         is all its items need. The result is the full model's backward pass, one block in memory at a time.
Encoders are always measured exactly (their models are small).

Interrupted work is not lost: the exact sweep writes its rows after every item, the fast sweep its rows and the
gradient entering the block it reached after every block (with the stored hidden states), and both resume there.

`measure_plans` grades whole plans on the same windows, always exactly: every plan's hidden states go through each
block in turn (one block read serves all plans), the check that the summed single-item damages predict the damage of
the plan, with random plans of the same size as the floor any method must beat.
"""

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import embed
from .apply import matrix_shape, module_bytes, quantizable_layers, quantize_layer
from .backends import QuantSettings, float_weight, get_backend
from .common import EWQError, write_json_atomic
from .device import pick_dtype
from .allocate import item_takes
from .quality import BATCH, TOP_K, kl_to_reference, load_corpus, make_windows
from .source import load_tokenizer
from .stream import StreamedModel, in_threads, release_freed_memory

CALIB_TOKENS = 512
CALIB_SENTENCES = embed.CALIB_SENTENCES  # encoders: calibration sentences from the end of the corpus
RANDOM_PLANS = 3
SWEEPS = ("fast", "exact")
FISHER_SAMPLES = 2  # sampled tokens per position for the Fisher estimate (each one backward pass; 2 and 4 rank
#                    SmolLM2's 210 matrices alike: Spearman 0.99)
# what "damage" means, by model kind; plans name their sensitivity fields after it (kl_4bit, cosine_loss_4bit)
METRICS = {"decoder": "kl", "encoder": "cosine_loss"}
# quantized layers kept from the sweep for the whole-plan checks (HQQ int4 takes ~0.1-0.5 s a matrix to make again);
# what does not fit is made again when a check needs it
KEPT_BYTES = 256 << 20


def item_layers(block, item) -> list:
    """(name, float layer) of the layers an item covers in its block (materialised)."""
    layers = quantizable_layers(block)
    if item["matrix"] is not None:
        layers = [(n, m) for n, m in layers if n == item["matrix"]]
        if not layers:
            raise EWQError(f"block {item['block']} has no matrix '{item['matrix']}'")
    return layers


class CastIO(torch.nn.Module):
    """A quantized layer built in the dtype it runs in at benchmark time (bf16 on the CPU: torchao's int4 kernel is
    ~100x slower in fp32) inside the fp32 calibration model: inputs cast in, outputs cast back."""

    def __init__(self, layer, dtype):
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x):
        return self.layer(x.to(self.dtype)).to(x.dtype)


def _job_key(job) -> tuple:
    block, name, _, precision = job
    return block, name, precision


def calibration_key(fingerprint: str, corpus, sample: dict, settings: QuantSettings, dtype, device: str,
                    granularity: str = "block", sweep_kind: str = "exact", layer_dtype=None) -> dict:
    """What the measured numbers depend on; `sample` says which text: {"windows", "window"} or {"sentences"}.
    Fields absent at their old values (exact sweep, layers in the model's dtype) keep older caches valid."""
    fast = {"sweep": "fast", "fisher_samples": FISHER_SAMPLES} if sweep_kind == "fast" else {}
    if fast and granularity == "block":  # since the streamed sweep a block is measured at its output, not as the
        fast["fisher_at"] = "block output"  # sum of its matrices: older per-block caches are not reused
    layers = {"layer_dtype": str(layer_dtype).replace("torch.", "")} if layer_dtype not in (None, dtype) else {}
    return {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256, **sample,
            "position": "end of corpus", "dtype": str(dtype).replace("torch.", ""), "device_type": device.split(":")[0],
            "granularity": granularity, **settings.key(), **fast, **layers}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class Calibration:
    """The calibration text, the streamed model and what the original computes on it, for a sweep or plan checks.

    Decoders: token windows, damage = mean KL(original || variant) per token.
    Encoders: sentences, damage = mean (1 - cosine) between the original's and the variant's sentence embeddings.
    After `load`: hidden[i][b] is what enters block i for batch b (hidden[-1]: after the last block), reference the
    original's output."""

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
        self.corpus_name = corpus.name
        self.sm = self.reference = self.hidden = None
        # llama.cpp: the importance matrix the file's rounding uses, so each matrix is measured rounded as it will be
        # written (prepare_importance); {checkpoint weight name: float32 [cols]}
        self.imatrix = self.importance = self.imatrix_file = None
        self._layers = {}  # quantized layers of the block being worked on, {(block, name, precision): layer}
        self._kept, self._kept_bytes = {}, 0  # quantized layers kept across blocks, up to KEPT_BYTES

    # ---- the streamed model and the original's output ----

    def batches(self) -> list:
        """The model inputs, batch by batch: windows in batches of quality.BATCH (as evaluate() runs them), sentences
        in the length-ordered batches of 32 the encoder suite embeds them in."""
        if self.kind == "encoder":
            self.order = self.embedder.length_batches(self.sentences, 32)
            return [self.embedder.tokenize([self.sentences[i] for i in idx]) for idx in self.order]
        return [{"input_ids": w} for w in self.windows.split(BATCH)]

    def open(self, progress: bool = False):
        """The streamed model with every block's extra inputs recorded; returns the first block's inputs."""
        if self.sm is None:
            self.sm = StreamedModel(self.source.path, self.ckpt, self.dtype, self.kind, self.batches(), self.device)
            self.check_memory()
        with torch.no_grad():
            return self.sm.capture()

    def load(self, progress: bool = True):
        """One streamed pass: the hidden states entering every block, and the original's output."""
        if self.hidden is None:
            states = self.open(progress)
            self.hidden = [states]
            with torch.no_grad():
                for i in tqdm(range(len(self.sm.blocks)), desc="calibration pass", disable=not progress, leave=False):
                    self.sm.block(i)
                    states = [self.sm.run_block(i, h, b) for b, h in enumerate(states)]
                    self.hidden.append(states)
                self.reference = self.original_output(states)
        return self

    def original_output(self, final) -> dict | torch.Tensor:
        """Decoders: the original's top-k log-probs at every predicted position (as quality.compute_reference keeps
        them); encoders: its sentence embeddings, in sentence order."""
        if self.kind == "encoder":
            return self.embeddings(final)
        values, indices, top1 = [], [], []
        for b, h in enumerate(final):
            logp = torch.log_softmax(self.sm.finish(b, h)[:, :-1].float(), dim=-1).cpu()
            v, i = logp.topk(min(TOP_K, logp.shape[-1]), dim=-1)
            values.append(v)
            indices.append(i.to(torch.int32))
            top1.append(logp.argmax(-1).to(torch.int32))
        return {"top_logp": torch.cat(values), "top_index": torch.cat(indices), "top1": torch.cat(top1)}

    def embeddings(self, final) -> torch.Tensor:
        out = [None] * len(self.sentences)
        for b, (idx, h) in enumerate(zip(self.order, final)):
            pooled = embed.pool(self.sm.finish(b, h), self.sm.batches[b]["attention_mask"], self.embedder.pooling)
            for i, e in zip(idx, pooled.cpu()):
                out[i] = e
        return torch.stack(out)

    def damage(self, final) -> float:
        """The damage of a variant whose final hidden states are `final` (0 for the original's)."""
        with torch.no_grad():
            if self.kind == "encoder":
                return (1 - embed.cosine(self.reference, self.embeddings(final))).mean().item()
            kl, n, offset = 0.0, 0, 0
            for b, h in enumerate(final):
                logp = torch.log_softmax(self.sm.finish(b, h)[:, :-1].float(), dim=-1).cpu()
                rows = slice(offset, offset + logp.shape[0])
                offset += logp.shape[0]
                kl += kl_to_reference(logp, self.reference["top_logp"][rows], self.reference["top_index"][rows]).sum().item()
                n += logp.shape[0] * logp.shape[1]
            return kl / n

    def check_memory(self):
        """Refuse, before any block is read, a machine that cannot hold what the sweep holds at once: the largest
        float block (twice: a block item's quantized copy beside it, float32 for llama.cpp's emulated formats), the
        float blocks kept for reuse, the hidden states entering every block, the gradients, the logits of a batch, the
        quantized layers kept for the checks, and 0.5 GB for the rest."""
        sm = self.sm
        tokens = sum(b["input_ids"].numel() for b in sm.batches)
        batch_tokens = max(b["input_ids"].numel() for b in sm.batches)
        hidden = sm.skeleton.config.get_text_config().hidden_size
        vocab = sm.head.out_features if sm.head is not None else 0
        item = max(sm.block_bytes(i) for i in range(len(sm.blocks)))
        state = (len(sm.blocks) + 1 + 2 * FISHER_SAMPLES) * tokens * hidden * 4 + 4 * batch_tokens * vocab * 4
        need = 2 * item + min(sm.cache_bytes, sum(sm.block_bytes(i) for i in range(len(sm.blocks)))) + state + \
            KEPT_BYTES + 5e8
        if self.device == "cpu":
            free, where = psutil.virtual_memory().available, "this machine's memory"
        else:
            free, where = torch.cuda.mem_get_info(torch.device(self.device))[0], f"{self.device}'s memory"
        if need > free:
            raise EWQError(f"the sensitivity sweep needs about {_gb(need)} at once (its largest block in "
                           f"{str(self.dtype).replace('torch.', '')} is {_gb(item)}), more than the {_gb(free)} free in "
                           f"{where}; free memory, use fewer --calib-tokens, or run on a larger machine")
        self.memory_needed_bytes = int(need)

    # ---- the importance matrix (llama.cpp plans) ----

    def uses_importance(self) -> bool:
        return self.settings.backend == "llama.cpp" and (self.settings.imatrix or "none") != "none"

    def prepare_importance(self, cache_file: Path, progress: bool = True):
        """Load or make the importance matrix (llama.cpp plans with settings.imatrix on): a user's imatrix file, or
        EWQ's own from the calibration windows (llama-imatrix's statistic: per input column of every block matrix,
        the mean of the squared inputs), written once as a llama.cpp GGUF imatrix at `cache_file` (the sensitivity
        cache's name: keyed like it). Refuses one of another model. Returns the file, or None when not used."""
        if not self.uses_importance():
            return None
        if self.importance is None:
            from .gguf_export import tensor_names, tensor_shapes
            from .imatrix import check_imatrix, importance_by_checkpoint_name, load_imatrix, save_imatrix

            names = tensor_names(self.source.path)
            if self.settings.imatrix != "calibration":
                self.imatrix_file = Path(self.settings.imatrix).resolve()
                im = load_imatrix(self.imatrix_file)
            elif Path(cache_file).is_file():
                self.imatrix_file, im = Path(cache_file), load_imatrix(cache_file)
            else:
                im = self._collect_importance(names, progress)
                self.imatrix_file = save_imatrix(im, cache_file)
            check_imatrix(im, tensor_shapes(self.source.path), self.source.id)
            self.imatrix, self.importance = im, importance_by_checkpoint_name(im, names)
        return self.imatrix_file

    def _collect_importance(self, names: dict, progress: bool):
        """One streamed pass over the calibration windows with every block's linear layers watched."""
        from .imatrix import ImportanceCollector

        collector = ImportanceCollector()
        states = self.open(progress)
        with torch.no_grad():
            for i in tqdm(range(len(self.sm.blocks)), desc="importance matrix", disable=not progress, leave=False):
                with collector.watching(self.sm.block(i), f"{self.ckpt.block_prefix}.{i}"):
                    states = [self.sm.run_block(i, h, b) for b, h in enumerate(states)]
        return collector.imatrix(names, datasets=[self.corpus_name], chunk_count=int(self.windows.shape[0]),
                                 chunk_size=int(self.windows.shape[1]))

    def _quantize(self, job):
        """quantize_layer for a job (block, name, layer, precision), the layer carrying its importance if any."""
        i, name, layer, precision = job
        if self.importance is not None:
            from .backends.llamacpp import IMPORTANCE_ATTR

            setattr(layer, IMPORTANCE_ATTR, self.importance.get(f"{self.ckpt.block_prefix}.{i}.{name}.weight"))
        return quantize_layer(layer, precision, self.settings, self.layer_dtype, self.device)

    # ---- variants: quantized layers swapped into a block, rounded embeddings or head ----

    def quantized_layers(self, jobs, keep: bool = True):
        """Yields ((block, name, layer, precision), quantized layer) for every job, in order, made `workers` at a time
        in threads (one torch thread each: ggml's k-quant searches and HQQ are thousands of small tensor ops that keep
        one core busy, and they release the interpreter while they run). Made layers are kept in the block's working
        set if `keep`, and across blocks while KEPT_BYTES allow (the whole-plan checks reuse them)."""
        jobs = list(jobs)
        todo = list({_job_key(job): job for job in jobs if self._known(job) is None}.values())
        made_now = zip(todo, in_threads(self._quantize, todo))
        made = {}
        for job in jobs:
            key = _job_key(job)
            while self._known(job) is None and key not in made:
                done = next(made_now, None)
                if done is None:  # asked for a second time and not kept: made again
                    done = (job, self._quantize(job))
                made[_job_key(done[0])] = self._remember(*done, keep)
            yield job, self._known(job) or made.pop(key)

    def _known(self, job):
        key = _job_key(job)
        return self._layers.get(key) or self._kept.get(key)

    def _remember(self, job, q, keep: bool):
        key = _job_key(job)
        if keep:
            self._layers[key] = q
        size = module_bytes(q)
        if self._kept_bytes + size <= KEPT_BYTES:  # kept for the whole-plan checks too, while they fit
            self._kept[key] = q
            self._kept_bytes += size
        return q

    def forget_layers(self, over_bytes: int = 0):
        """Drop the quantized layers kept (all, or only if they take more than `over_bytes`)."""
        if over_bytes and sum(module_bytes(q) for q in self._layers.values()) <= over_bytes:
            return
        self._layers.clear()

    def menu_of(self, item) -> list:
        """The precisions an item is measured at: the menu's that the item takes (allocate.item_takes)."""
        return [p for p in self.menu if item_takes(item, p)]

    @contextmanager
    def swapped(self, i: int, assignments):
        """Block i (materialised) with the layers of `assignments` [(item, precision)] quantized; restored after."""
        block = self.sm.block(i)
        backend = get_backend(self.settings.backend)
        jobs = [(i, name, layer, precision) for item, precision in assignments if precision != "raw"
                for name, layer in item_layers(block, item)
                if not backend.unsupported(matrix_shape(layer), precision, self.settings)]  # else kept raw, as apply_plan
        done = []
        try:
            for (_, name, layer, _), q in self.quantized_layers(jobs):
                block.set_submodule(name, q if self.layer_dtype == self.dtype else CastIO(q, self.layer_dtype))
                done.append((name, layer))
            yield block
        finally:
            for name, layer in done:
                block.set_submodule(name, layer)

    def round_trip(self, weight: torch.Tensor, precision: str, name: str | None = None) -> torch.Tensor:
        """The embeddings' or head's rows after the format (llama.cpp: with the importance of checkpoint tensor
        `name` when the importance matrix has it: only a head, from llama-imatrix --process-output)."""
        imp = self.importance.get(name) if self.importance and name else None
        kwargs = {"importance": imp} if imp is not None else {}
        return get_backend(self.settings.backend).round_trip(weight, precision, self.settings, **kwargs).to(self.dtype)

    @contextmanager
    def rounded_others(self, assignments):
        """The token embeddings and/or output head of a llama.cpp plan replaced by their round trip through the format
        (a tied matrix changes in both places, as in the file). Yields whether the embeddings changed."""
        sm = self.sm
        table = sm.embedding.weight.data
        changed = False
        try:
            for item, precision in assignments:
                if precision == "raw":
                    continue
                if item["matrix"] == sm.embedding_info.name:
                    sm.embedding.weight.data = self.round_trip(table, precision)  # the rows used: rows round alone
                    changed = True
                if sm.head is not None and item["matrix"] == sm.head_info.name:
                    self.round_head(precision)
            yield changed
        finally:
            sm.embedding.weight.data = table
            if sm.head is not None:
                self.round_head(None)

    def round_head(self, precision: str | None):
        """The output head computed as the format makes it (its rows' round trip, and its input rounded as the
        backend's kernel rounds it: llama.cpp's), or as the checkpoint's again (None)."""
        head, name = self.sm.head, self.sm.head_info.name
        round_input = getattr(get_backend(self.settings.backend), "round_input", None)
        head.transform = None if precision is None else lambda rows: self.round_trip(rows, precision, name)
        head.round_input = None if precision is None or round_input is None else lambda x: round_input(x, precision)

    def score(self, assignments) -> float:
        """The damage of the model with `assignments` [(item, precision)] applied, measured exactly from the stored
        hidden states: the first changed block onwards (or everything, when the embeddings change)."""
        others = [(it, p) for it, p in assignments if it["block"] is None]
        by_block = {}
        for it, p in assignments:
            if it["block"] is not None and p != "raw":
                by_block.setdefault(it["block"], []).append((it, p))
        n = len(self.sm.blocks)
        with self.rounded_others(others) as embeddings_changed:
            start = 0 if embeddings_changed else min(by_block, default=n)
            with torch.no_grad():
                states = self.open() if embeddings_changed else self.hidden[start]
                for i in range(start, n):
                    with self.swapped(i, by_block.get(i, [])):
                        states = [self.sm.run_block(i, h, b) for b, h in enumerate(states)]
            result = self.damage(states)
        self.forget_layers()
        return result


def sweep(calibration: "Calibration", items=None, done=None, save=None, progress: bool = True) -> list:
    """The exact sweep: [{precision: damage}] per item (default: every block), each item alone quantized and scored
    exactly. `done` holds rows measured earlier (resumed); `save(rows)` is called after every item."""
    c = calibration.load(progress)
    if items is None:
        items = [{"block": i, "matrix": None} for i in range(len(c.sm.blocks))]
    rows = list(done or [])
    for item in tqdm(items[len(rows):], desc="sensitivity", initial=len(rows), total=len(items),
                     disable=not progress, leave=False):
        rows.append({precision: c.score([(item, precision)]) for precision in c.menu_of(item)})
        if save:
            save(rows)
    return rows


def cache_path(calibration: Calibration, cache_dir) -> Path:
    key = calibration.key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / ".sensitivity" / f"sensitivity_{key['fingerprint'][:12]}_{digest}.json"


def measure(calibration: Calibration, items, cache_dir, progress: bool = True):
    """(per-item sensitivities, calibration key, cached?). A llama.cpp calibration with importance first loads or makes
    its importance matrix (calibration.imatrix_file, beside the cache), so every matrix is rounded as it will be."""
    key = calibration.key
    path = cache_path(calibration, cache_dir)
    calibration.prepare_importance(path.with_suffix(".imatrix.gguf"), progress)
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
        rows = fast_sweep(calibration, items, progress, state_dir=path.with_suffix(".partial"))
        save(rows)
    else:
        rows = sweep(calibration, items, done=done, save=save, progress=progress)
    return rows, key, False


def measure_plans(calibration: Calibration, items, plans, progress: bool = True) -> list:
    """The damage (calibration.metric) of each whole plan (a precision per item) on the calibration text, exactly:
    all plans go through the blocks together, each block read once; a quantized layer serves every plan that uses it."""
    c = calibration.load(progress)
    per_plan = [list(zip(items, precisions)) for precisions in plans]
    states = []
    for assignments in per_plan:
        with c.rounded_others([(it, p) for it, p in assignments if it["block"] is None]) as embeddings_changed:
            states.append(c.open() if embeddings_changed else c.hidden[0])
    with torch.no_grad():
        for i in tqdm(range(len(c.sm.blocks)), desc="whole-plan checks", disable=not progress, leave=False):
            for k, assignments in enumerate(per_plan):
                with c.swapped(i, [(it, p) for it, p in assignments if it["block"] == i]):
                    states[k] = [c.sm.run_block(i, h, b) for b, h in enumerate(states[k])]
                c.forget_layers(over_bytes=256 << 20)
            c.forget_layers()
            release_freed_memory(len(per_plan) * c.sm.block_bytes(i))  # each plan's quantized copies of block i
    out = []
    for k, assignments in enumerate(per_plan):
        with c.rounded_others([(it, p) for it, p in assignments if it["block"] is None]):
            out.append(c.damage(states[k]))
    return out


# ---- the fast sweep: every item from one forward and FISHER_SAMPLES backward passes, block by block ----

def fisher_kl(delta: torch.Tensor, grads: torch.Tensor, tokens: int) -> float:
    """1/2 dY' F dY per token, F estimated from sampled gradients: per window and output feature,
    mean over samples of (sum over positions of g * dY)^2. delta [W, T, out]; grads [S, W, T, out]."""
    dots = torch.einsum("swto,wto->swo", grads.float(), delta.float())
    return 0.5 * dots.pow(2).mean(0).sum().item() / tokens


def head_gradients(c: Calibration, samples: int = FISHER_SAMPLES, seed: int = 0) -> list:
    """grads[s][b]: the gradient of sum(log p(y)) with respect to the final hidden states of batch b, y drawn from the
    model's own distribution (sample s)."""
    generator = torch.Generator().manual_seed(seed)
    grads = [[None] * len(c.hidden[-1]) for _ in range(samples)]
    for b, h in enumerate(c.hidden[-1]):
        h = h.detach().requires_grad_()
        with torch.enable_grad():
            logp = torch.log_softmax(c.sm.finish(b, h)[:, :-1].float(), dim=-1).flatten(0, 1)  # [W*T, V]
            probs = logp.detach().exp().cpu()  # sampled on the CPU: one generator, the same tokens on any device
            for s in range(samples):
                y = torch.multinomial(probs, 1, generator=generator).to(logp.device)
                grads[s][b] = torch.autograd.grad(logp.gather(1, y).sum(), h, retain_graph=s + 1 < samples)[0]
    return grads


def block_backward(c: Calibration, i: int, grads_out: list, names) -> tuple:
    """Block i run again with autograd on its stored inputs; the sampled gradients at its output (grads_out[s][b])
    pulled back through it. Returns (gradients at its input [s][b], {layer name: {"x": [b], "g": [b][S, ...]}} for the
    layers `names`, the block's float output [b])."""
    block = c.sm.block(i)
    layers = {n: m for n, m in quantizable_layers(block) if n in names}
    samples = len(grads_out)
    captured = {n: {"x": [], "g": []} for n in layers}
    outputs, handles = {}, []
    for n, m in layers.items():
        def hook(module, args, output, n=n):
            captured[n]["x"].append(args[0].detach())
            outputs[n] = output
        handles.append(m.register_forward_hook(hook))
    grads_in = [[None] * len(grads_out[0]) for _ in range(samples)]
    float_out = []
    try:
        for b, h in enumerate(c.hidden[i]):
            h = h.detach().requires_grad_()
            outputs.clear()
            with torch.enable_grad():
                out = c.sm.run_block(i, h, b)
                targets = [h] + [outputs[n] for n in layers]
                per_sample = [torch.autograd.grad(out, targets, grad_outputs=grads_out[s][b], retain_graph=s + 1 < samples)
                              for s in range(samples)]
            for s, g in enumerate(per_sample):
                grads_in[s][b] = g[0]
            for k, n in enumerate(layers):  # bfloat16: half the memory, as the ranking needs no more
                captured[n]["g"].append(torch.stack([g[k + 1] for g in per_sample]).to(torch.bfloat16))
            float_out.append(out.detach())
    finally:
        for handle in handles:
            handle.remove()
    return grads_in, captured, float_out


def block_items_kl(c: Calibration, i: int, block_items, grads_out: list, captured: dict, float_out: list) -> dict:
    """{position in items: {precision: estimated KL}} for the items of block i."""
    backend = get_backend(c.settings.backend)
    block = c.sm.block(i)
    layers = dict(quantizable_layers(block))
    rows = {}
    with torch.no_grad():
        for k, item in block_items:
            row = {}
            for precision in c.menu_of(item):
                total = 0.0  # (a matrix its kernel cannot take stays raw: no change)
                if item["matrix"] is None:  # a block: the change of its output, the whole block quantized
                    with c.swapped(i, [(item, precision)]):
                        for b, h in enumerate(c.hidden[i]):
                            grads = torch.stack([g[b] for g in grads_out])
                            total += fisher_kl(c.sm.run_block(i, h, b) - float_out[b], grads, c.tokens)
                    c.forget_layers()
                row[precision] = total
            if item["matrix"] is not None:  # a matrix: every format at once (made in parallel)
                layer = layers[item["matrix"]]
                jobs = [(i, item["matrix"], layer, p) for p in row
                        if not backend.unsupported(matrix_shape(layer), p, c.settings)]
                for (_, name, _, precision), q in c.quantized_layers(jobs, keep=False):
                    row[precision] = matrix_kl(c, q, layer, captured[name], precision)
            rows[k] = row
    return rows


def matrix_kl(c: Calibration, q, layer, cap: dict, precision: str) -> float:
    """One matrix at one format (q: the quantized layer): the change of its layer's output on the captured inputs,
    through the Fisher."""
    backend = get_backend(c.settings.backend)
    weight = backend.dequantize(q)
    round_input = getattr(backend, "round_input", None)
    total = 0.0
    for x, grads in zip(cap["x"], cap["g"]):
        if weight is not None:  # the output's change is x @ (W_q - W)^T, exactly, in fp32 ...
            x = x.float()
            delta = x @ (weight - float_weight(layer)[0].float()).T
            if round_input is not None:  # ... + (x_q - x) @ W_q^T where the kernel rounds its input too (llama.cpp)
                delta += (round_input(x, precision) - x) @ weight.T
        else:  # the layer quantizes its activations too: run it
            delta = CastIO(q, c.layer_dtype)(x).float() - layer(x).float()
        total += fisher_kl(delta, grads, c.tokens)
    return total


def embedding_gradients(c: Calibration, grads0: list) -> list:
    """grads[s][b] at the token embeddings' output, from those at the first block's input (grads0), through whatever
    the model does in between (GPT-2 adds position embeddings; Llama nothing)."""
    roots = []

    def root(out):
        r = out.detach().requires_grad_()
        roots.append(r)
        return r

    first = c.sm.capture(on_embeddings=root)
    out = [[None] * len(first) for _ in grads0]
    for b, h in enumerate(first):
        for s, g in enumerate(grads0):
            out[s][b] = g[b] if h is roots[b] else \
                torch.autograd.grad(h, roots[b], grad_outputs=g[b], retain_graph=s + 1 < len(grads0))[0]
    return out


def other_kl(c: Calibration, item, precision: str, grads0: list) -> float:
    """An embeddings/head item of a llama.cpp plan: the embedding path by the Fisher estimate at the embeddings'
    output; the output head (the same matrix when tied, or lm_head) by the exact KL of the head alone."""
    sm, total = c.sm, 0.0
    if item["matrix"] == sm.embedding_info.name:
        if not hasattr(c, "_embedding_grads"):
            c._embedding_grads = embedding_gradients(c, grads0)
        table = sm.embedding.weight.data
        change = c.round_trip(table, precision).float() - table.float()  # only the rows the text uses: rows round alone
        for b, batch in enumerate(sm.batches):
            grads = torch.stack([g[b] for g in c._embedding_grads])
            total += fisher_kl(change[batch["input_ids"].to(change.device)], grads, c.tokens)
    if sm.head is not None and item["matrix"] == sm.head_info.name:
        total += head_kl(c, precision)
    return total


def head_kl(c: Calibration, precision: str) -> float:
    """Mean KL(original || head with rounded weights) per token, on the head's inputs (the final norm's output)."""
    sm = c.sm
    if not hasattr(c, "_head_inputs"):
        inputs = []
        handle = sm.head.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()[:, :-1]))
        try:
            with torch.no_grad():
                for b, h in enumerate(c.hidden[-1]):
                    sm.finish(b, h)
        finally:
            handle.remove()
        c._head_inputs = inputs
    total, n = 0.0, 0
    with torch.no_grad():
        for h in c._head_inputs:
            p = torch.log_softmax(sm.head(h).float(), dim=-1)
            c.round_head(precision)
            try:
                q = torch.log_softmax(sm.head(h).float(), dim=-1)
            finally:
                c.round_head(None)
            total += (p.exp() * (p - q)).sum().item()
            n += h.shape[0] * h.shape[1]
    return total / n


def fast_sweep(calibration: Calibration, items, progress: bool = True, state_dir=None) -> list:
    """[{precision: estimated KL}] per item (see the module docstring), block by block from the last. After every
    block its rows and the gradients entering it are written to `state_dir`, from where an interrupted sweep resumes."""
    c = calibration
    state = SweepState(state_dir, c.key) if state_dir else None
    resumed = state.load(c.device) if state else None
    if resumed:
        c.open()
        c.hidden, c.reference = resumed["hidden"], resumed["reference"]
        grads, rows, next_block = resumed["grads"], resumed["rows"], resumed["next_block"]
    else:
        c.load(progress)
        grads, rows, next_block = head_gradients(c), {}, len(c.sm.blocks) - 1
        if state:
            state.save_forward(c.hidden, c.reference)
    c.tokens = sum(b["input_ids"].numel() - b["input_ids"].shape[0] for b in c.sm.batches)
    by_block = {}
    for k, item in enumerate(items):
        by_block.setdefault(item["block"], []).append((k, item))
    n = len(c.sm.blocks)
    bar = tqdm(total=n, initial=n - 1 - next_block, desc="sensitivity (fast), blocks", disable=not progress,
               leave=False)
    for i in range(next_block, -1, -1):
        block_items = by_block.get(i, [])
        names = {it["matrix"] for _, it in block_items if it["matrix"] is not None}
        grads_in, captured, float_out = block_backward(c, i, grads, names)
        rows.update(block_items_kl(c, i, block_items, grads, captured, float_out))
        grads = grads_in
        del captured, float_out
        # the block's captures and quantized copies: back to the OS, not kept as heap
        release_freed_memory(c.sm.block_bytes(i) * (1 + len(block_items)))
        if state:
            state.save_progress(i - 1, rows, grads)
        bar.update(1)
    bar.close()
    for k, item in by_block.get(None, []):
        rows[k] = {precision: other_kl(c, item, precision, grads) for precision in c.menu_of(item)}
    if state:
        state.clear()
    return [rows[k] for k in range(len(items))]


class SweepState:
    """Where an interrupted fast sweep resumes: the forward pass (hidden states entering every block, the reference),
    then after every block the rows so far and the gradients entering that block. Written to temporary names and
    renamed; the progress file names the gradient file it goes with."""

    def __init__(self, path, key: dict):
        self.path, self.key = Path(path), key

    def save_forward(self, hidden, reference):
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {f"hidden.{i}.{b}": h.cpu().contiguous() for i, hs in enumerate(hidden) for b, h in enumerate(hs)}
        if isinstance(reference, dict):
            tensors.update({f"reference.{k}": v.cpu().contiguous() for k, v in reference.items()})
        else:
            tensors["reference"] = reference.cpu().contiguous()
        self._write(self.path / "forward.safetensors", tensors)

    def save_progress(self, next_block: int, rows: dict, grads: list):
        name = f"grads.{next_block}.safetensors"
        self._write(self.path / name, {f"g.{s}.{b}": g.cpu().contiguous() for s, gs in enumerate(grads)
                                       for b, g in enumerate(gs)})
        write_json_atomic(self.path / "progress.json", {"calibration": self.key, "next_block": next_block,
                                                          "grads": name, "rows": {str(k): v for k, v in rows.items()}})
        for old in self.path.glob("grads.*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, device: str = "cpu"):
        try:
            progress = json.loads((self.path / "progress.json").read_text())
            if progress["calibration"] != self.key:
                return None
            forward = load_file(self.path / "forward.safetensors")  # the reference stays on the CPU, as made
            grads_file = load_file(self.path / progress["grads"], device=device)
        except (OSError, ValueError, KeyError):
            return None
        hidden, reference, grads = {}, {}, {}
        for name, t in forward.items():
            if name.startswith("hidden."):
                _, i, b = name.split(".")
                hidden.setdefault(int(i), {})[int(b)] = t.to(device)
            elif name == "reference":
                reference = t
            else:
                reference[name.split(".", 1)[1]] = t
        for name, t in grads_file.items():
            _, s, b = name.split(".")
            grads.setdefault(int(s), {})[int(b)] = t
        as_lists = lambda d: [[d[i][b] for b in sorted(d[i])] for i in sorted(d)]  # noqa: E731
        return {"hidden": as_lists(hidden), "reference": reference, "grads": as_lists(grads),
                "rows": {int(k): v for k, v in progress["rows"].items()}, "next_block": progress["next_block"]}

    @staticmethod
    def _write(path: Path, tensors: dict):
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    def clear(self):
        shutil.rmtree(self.path, ignore_errors=True)
