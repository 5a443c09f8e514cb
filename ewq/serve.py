"""Serve one model over HTTP (FastAPI + uvicorn): EWQ's own endpoints and OpenAI-compatible ones.

    python -m ewq.serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...   (--help: every flag)

GET  /health              200 {"status": "ok"} (503 "draining" after SIGTERM); never needs the API key
GET  /metrics             Prometheus text: requests by route and status, latency, batch sizes, queue wait
GET  /models/active       what is loaded, read from the directory's metadata.json, never guessed (a directory
                          without one says is_quantized null and metadata "missing"), and how requests are batched
POST /embed               encoders: {"sentences": [str, ...]} -> {"embeddings", "dim", "truncated", "note"}
POST /generate            decoders: {"prompt": str, "max_new_tokens": int} -> greedy continuation, exactly that long
GET  /v1/models, /v1/models/{id}    the one served model, in OpenAI's shape
POST /v1/embeddings       encoders, OpenAI's request and answer: input a string or a list of strings; encoding_format
                          float or base64 (little-endian float32, what the openai client asks for by default);
                          dimensions only if equal to the model's (vectors are never cut short). Extra field
                          `truncated`: indices of the inputs longer than the token limit, embedded from their first
                          tokens (and `note` saying so). usage counts the tokens the model read (special tokens
                          included, after truncation). Token-id input is refused: those are tiktoken ids.
POST /v1/completions      decoders: prompt a string or a list of strings; greedy, not streamed; max_tokens
                          (default 16, as OpenAI), stop (a string or up to 4), finish_reason "stop" or "length".
                          The prompt is continued as given (no chat template; /generate applies the template).
                          temperature and top_p are accepted and ignored: decoding is always greedy.

Errors: EWQ's endpoints answer {"error": "..."}, the others OpenAI's {"error": {"message", "type", "param", "code"}}:
400 a bad request, 401 a missing or wrong API key, 404 an unknown model or path, 413 a body over --max-body-bytes
(also when sent chunked, without Content-Length), 429 (with Retry-After) when more than --max-queue inputs are
waiting, 503 (with x-should-retry: false) when a request takes longer than --timeout. Nothing a client sends
produces a 5xx or a traceback, and the server keeps serving. It binds to 127.0.0.1 unless told otherwise. A model
saved by `benchmark.py --save` is loaded quantized, as saved; any other directory is loaded as it is (float).

Batching: concurrent embedding requests are gathered into one batch (up to --max-batch inputs, the oldest request
first with the waiting ones closest to it in length, waiting at most --max-wait-ms for company unless requests
have been coming one at a time), run on one worker
thread so the event loop keeps accepting requests; the batch is split into forward passes of similar lengths where
that costs less than the padding (`length_groups`). A request larger than --max-batch is cut into chunks, shortest
inputs together, enqueued one after the other so other requests get their turn between them. A request whose
client goes away or times out is withdrawn: its queued chunks never run, its generation stops at the next token.
Requests share a forward pass only where a sentence's vector does not depend on its batch-mates beyond float
rounding (see `batching_policy`): a model whose activation scales are shared across the batch (torch dynamic int8:
one scale per tensor; bitsandbytes LLM.int8: outlier columns chosen over the batch) runs each request's inputs on
their own (a request's vectors then depend on that request only), and says so at start-up and in /models/active.
Decoders run one prompt at a time.

Shutdown: SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish (at most
--graceful-timeout seconds) and answers them with `Connection: close`, so keep-alive clients do not reuse a
connection that is about to close.
"""

import asyncio
import base64
import collections
import dataclasses
import functools
import hmac
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from .common import ArgumentParser, EWQError, run_cli

MAX_SENTENCES = 256        # inputs per request (--max-inputs)
MAX_NEW_TOKENS = 512       # /generate's max_new_tokens, /v1/completions' max_tokens
MAX_STOP = 4               # stop sequences per completion request, as OpenAI
DEFAULT_MAX_TOKENS = 16    # OpenAI's default max_tokens for /v1/completions
LEGACY_PATHS = ("/embed", "/generate", "/models/active")  # EWQ's own endpoints keep their {"error": "..."} bodies
OPEN_PATHS = ("/health",)  # no API key needed: a load balancer's probe has none
TOKEN_IDS_REFUSED = ("input holds token ids, not text: OpenAI clients send tiktoken ids (OpenAI's vocabulary), which "
                     "mean nothing to this model's vocabulary; send strings. langchain's OpenAIEmbeddings sends token "
                     "ids unless created with check_embedding_ctx_length=False")


def active_info(path: Path, ckpt, meta: dict | None) -> dict:
    """The /models/active answer: facts from metadata.json (`meta`, None when the directory has none) and the
    checkpoint's headers."""
    info = {"name": path.name, "path": str(path.resolve()), "kind": ckpt.kind, "architecture": ckpt.architecture,
            "block_count": len(ckpt.blocks), "metadata": "missing", "is_quantized": None, "method": None,
            "precision_counts": None, "matrix_counts": None, "avg_bits_per_weight": None, "base_model": None, "fingerprint": None}
    if meta is None:
        return info
    quantized = meta.get("is_quantized")
    info.update(metadata="present", is_quantized=quantized if isinstance(quantized, bool) else None,
                method=meta.get("method"), base_model=meta.get("base_model"),
                precision_counts=meta.get("counts"), matrix_counts=meta.get("matrix_counts"),
                avg_bits_per_weight=meta.get("avg_bits_per_weight"),
                fingerprint=meta.get("base_fingerprint") if quantized else meta.get("fingerprint"))
    if quantized:
        info["artifact_fingerprint"] = meta.get("artifact_fingerprint")
        info["plan_hash"] = meta.get("plan_hash")
    return info


def batching_policy(meta: dict | None, kind: str) -> dict:
    """May requests share a forward pass? Only where a sentence's vector provably does not depend on what else is in
    the batch beyond float rounding. Measured on MiniLM-L6 (a sentence alone vs in a padded batch of 32): fp32 max
    |d| 1.5e-7 (cosine 1.0); weight-only int8 1.5e-7 (activations stay float); torch's dynamic int8, one activation
    scale per tensor, i.e. per batch, cosine down to 0.925; torchao's per-token int8 activations are exact layer by
    layer, but float noise upstream (which attention kernel, which sgemm path for few rows) flips int8 roundings:
    max |d| 1.6e-2 end to end. `meta` is metadata.json (save_quantized writes `method`, `counts`, `int8_activations`)."""
    def policy(cross: bool, why: str, tolerance: str | None = None) -> dict:
        return {"cross_request": cross, "why": why, "tolerance": tolerance}

    if kind != "encoder":
        return policy(False, "decoders generate one prompt at a time, in arrival order")
    float_noise = "float rounding only: max |d| ~1e-7, cosine >= 0.99999 (MiniLM-L6 measured 1.5e-7)"
    if not meta or not meta.get("is_quantized"):
        return policy(True, "float weights and activations: a sentence's vector does not depend on its batch-mates",
                      float_noise)
    method = meta.get("method")
    counts = [meta.get("counts"), meta.get("matrix_counts")]
    has_8bit = any(c.get("8-bit", 0) > 0 for c in counts if isinstance(c, dict)) or not any(
        isinstance(c, dict) for c in counts)  # counts unknown: assume the 8-bit layers are there
    if method == "dynamic-ptq-int8":
        return policy(False, "torch dynamic int8 quantizes each layer's input with one scale per tensor, i.e. per "
                             "batch: a sentence's vector would depend on the other requests in its forward pass "
                             "(cosine down to 0.925 measured), so each request's inputs run on their own")
    if method == "ewq-bitsandbytes" and has_8bit:
        return policy(False, "bitsandbytes LLM.int8 picks its outlier columns over the whole batch: a sentence's "
                             "vector would depend on the other requests in its forward pass, so each request's "
                             "inputs run on their own")
    if method == "ewq-torchao" and meta.get("int8_activations") and has_8bit:
        return policy(True, "torchao int8 activations are scaled per token, so no sentence sets another's scale; "
                            "float noise upstream can still flip an int8 rounding",
                      "measured on MiniLM-L6: max |d| 1.6e-2 alone vs in a batch (use --cross-batch off for exact)")
    return policy(True, "weight-only quantization: activations stay float, a sentence's vector does not depend "
                        "on its batch-mates", float_noise)


@dataclasses.dataclass
class ServeSettings:
    """What the HTTP layer enforces (python -m ewq.serve --help explains each)."""
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    max_body_bytes: int = 2 << 20
    timeout_s: float = 60.0
    api_key: str | None = None
    model_name: str | None = None
    cross_batch: str = "auto"   # auto (batching_policy), on, off
    threads: int | None = None  # torch intra-op threads of the model worker (None: leave torch's setting)


class Service:
    """The loaded model and what running it needs. The HTTP layer runs every model call on one worker thread; the
    lock only guards direct callers (tests, scripts) from running it twice at once."""

    def __init__(self, model_spec: str, models_dir: str = "models", device: str = "cpu",
                 max_inputs: int = MAX_SENTENCES, max_input_tokens: int | None = None):
        from .apply import load_model
        from .artifact import load_quantized, read_metadata
        from .checkpoint import open_checkpoint
        from .device import pick_dtype
        from .source import load_tokenizer, resolve_model

        source = resolve_model(model_spec, models_dir)
        self.path, self.device, self.max_inputs = source.path, device, max_inputs
        self.ckpt = open_checkpoint(source.path)
        self.kind = self.ckpt.kind
        self.tokenizer = load_tokenizer(source.path)
        meta = read_metadata(source.path)
        if meta and meta.get("is_quantized"):
            self.model = load_quantized(source.path, self.kind)[0]
        else:
            # a float checkpoint runs in the benchmarks' default dtype for its kind and device
            self.model = load_model(source.path, pick_dtype(None, device, "", self.kind), self.kind)
        self.model.to(device)
        self.info = active_info(source.path, self.ckpt, meta)
        self.batching = batching_policy(meta, self.kind)
        config = self.ckpt.config
        if self.kind == "encoder":
            from .embed import Embedder

            self.embedder = Embedder.of(source.path, config, self.tokenizer)
            model_limit = self.embedder.max_length
            if max_input_tokens:
                self.embedder = dataclasses.replace(self.embedder, max_length=min(max_input_tokens, model_limit))
            self.dim = int(config.get("hidden_size") or 0)
            self.info.update(pooling=self.embedder.pooling.mode, normalize=self.embedder.pooling.normalize,
                             max_length=self.embedder.max_length, model_max_length=model_limit, dim=self.dim)
        else:
            self.context = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
            self.max_prompt_tokens = min(max_input_tokens or self.context, self.context - 1)
            self.info.update(context_length=self.context, max_prompt_tokens=self.max_prompt_tokens)
        self.lock = threading.Lock()

    # ---- encoders ----

    def check_sentences(self, sentences) -> list:
        """/embed's checks, with its messages."""
        from .embed import check_sentences

        if self.kind != "encoder":
            raise EWQError(f"{self.info['name']} is a decoder; it has no sentence embeddings (use POST /generate)")
        sentences = check_sentences(sentences)
        if len(sentences) > self.max_inputs:
            raise EWQError(f"{len(sentences)} sentences in one request; send at most {self.max_inputs}")
        bad = next((i for i, s in enumerate(sentences) if not utf8_able(s)), None)
        if bad is not None:
            raise EWQError(f"sentence {bad} is not valid Unicode (it holds a lone surrogate escape)")
        return sentences

    def embed_rows(self, sentences: list, grouped: bool = False) -> list:
        """[(float32 vector, tokens read, truncated?)] for `sentences`, in order: one padded forward pass, or with
        `grouped` (only where batch-mates do not change a vector) one pass per length group (`length_groups`).
        Runs on the worker thread."""
        limit = self.embedder.max_length
        full = [len(ids) for ids in self.tokenizer(sentences, add_special_tokens=True, truncation=False)["input_ids"]]
        used = [min(n, limit) for n in full]
        vectors = [None] * len(sentences)
        with self.lock:
            for group in length_groups(used) if grouped else [range(len(sentences))]:
                batch = self.embedder.batch(self.model, [sentences[i] for i in group], self.device).numpy()
                for i, v in zip(group, batch):
                    vectors[i] = v
        return [(v, n, f > limit) for v, n, f in zip(vectors, used, full)]

    def embed(self, sentences) -> dict:
        """/embed's answer, computed here and now: the request's sentences on their own, shortest together."""
        sentences = self.check_sentences(sentences)
        rows = [None] * len(sentences)
        for chunk in length_chunks(sentences, 32):  # as Embedder.embed batches
            for i, row in zip(chunk, self.embed_rows([sentences[i] for i in chunk])):
                rows[i] = row
        return self.embed_answer(rows)

    def embed_answer(self, rows: list) -> dict:
        import numpy as np

        vectors = np.stack([v for v, _, _ in rows])
        cut = [i for i, (_, _, t) in enumerate(rows) if t]
        out = {"model": self.info["name"], "dim": int(vectors.shape[1]), "embeddings": vectors.tolist(), "truncated": cut}
        if cut:
            out["note"] = truncation_note(len(cut), self.embedder.max_length)
        return out

    # ---- decoders ----

    def generate(self, prompt, max_new_tokens) -> dict:
        """/generate: exactly max_new_tokens greedy tokens after the chat-templated prompt (generate_exact)."""
        from .generate import encode_prompt, generate_exact

        if self.kind != "decoder":
            raise EWQError(f"{self.info['name']} is an encoder; it does not generate text (use POST /embed)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EWQError("give a non-empty string as prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise EWQError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}")
        if not utf8_able(prompt):
            raise EWQError("the prompt is not valid Unicode (it holds a lone surrogate escape)")
        ids = encode_prompt(self.tokenizer, prompt)
        if ids.shape[1] + max_new_tokens > self.context:
            raise EWQError(f"the prompt is {ids.shape[1]} tokens; with max_new_tokens {max_new_tokens} that passes "
                           f"the model's context of {self.context} tokens")
        with self.lock:
            tokens = generate_exact(self.model, ids, max_new_tokens, self.device, clock=False)[2]
        return {"model": self.info["name"], "text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                "new_tokens": len(tokens)}

    def complete(self, ids: list, max_tokens: int, stop: list, cancel: threading.Event | None = None) -> dict:
        """/v1/completions for one prompt: greedy until an end-of-sequence token, a stop sequence (cut from the
        text, as OpenAI does) or max_tokens. Stops early when `cancel` is set (the client went away). Runs on the
        worker thread."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer, start = self.tokenizer, len(ids)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = cancel is not None and cancel.is_set()
                if stop and not done:
                    text = tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
                    done = any(s in text for s in stop)
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        config = self.model.generation_config
        eos = config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        input_ids = torch.tensor([ids], device=self.device)
        with self.lock, torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                                      do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
                                      stopping_criteria=StoppingCriteriaList([Stop()]),
                                      pad_token_id=config.pad_token_id if config.pad_token_id is not None else min(eos, default=0))
        new = out[0, start:].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True)
        cuts = [text.index(s) for s in stop if s in text]
        if cuts:
            return {"text": text[:min(cuts)], "finish_reason": "stop", "tokens": len(new)}
        finish = "stop" if new and new[-1] in eos else "length"
        return {"text": text, "finish_reason": finish, "tokens": len(new)}

    def warm_up(self) -> None:
        """One tiny run before serving: the first request should not pay for lazy initialisation."""
        if self.kind == "encoder":
            rows = self.embed_rows(["warm up"])
            self.dim = int(rows[0][0].shape[0])
            self.info["dim"] = self.dim
        else:
            self.complete(self.tokenizer("warm up").input_ids, 1, [])


def utf8_able(text: str) -> bool:
    """JSON may carry lone surrogate escapes ("\\ud800"): valid JSON, not text; the tokenizer would fail on them."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def truncation_note(count: int, limit: int) -> str:
    return f"{count} sentence(s) longer than {limit} tokens were embedded from their first {limit} tokens"


PASS_COST_TOKENS = 16  # what one forward pass costs beyond its tokens, in tokens (MiniLM-L6, CPU: see length_groups)


def length_groups(lengths: list, pass_cost: int = PASS_COST_TOKENS) -> list:
    """Split a batch into forward passes of similar lengths: the split (of the length-sorted inputs) that minimises
    padded tokens + pass_cost per pass. A padded pass costs its longest input times its size; a pass also costs
    something of its own (dispatch, small matrices). Measured on MiniLM-L6 with one thread, corpus sentences of
    ~25 tokens: one at a time 35 sentences/s, batches of 32 in arrival order 33 (padding), of 8 sorted by length
    54; a pass's own cost came to ~14 tokens. Exact dynamic programming, O(n^2) for n inputs."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ordered = [lengths[i] for i in order]
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # a pass over ordered[i:j], padded to ordered[j - 1]
            cost = best[i] + pass_cost + (j - i) * ordered[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def length_chunks(items: list, size: int) -> list:
    """Index chunks of at most `size`, shortest items together: a padded batch wastes less on padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    return [order[s:s + size] for s in range(0, len(order), size)]


# ---- batching ----

class Overloaded(Exception):
    """More than max_queue inputs would be waiting: answer 429 with Retry-After."""


class Closed(Exception):
    """The server is shutting down: no new work."""


@dataclasses.dataclass(eq=False)
class _Job:
    items: list
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Gathers embedding requests into forward passes on one worker thread.

    One asyncio task (the collector) takes the first waiting job, then, where the model allows requests to share a
    forward pass (`cross_request`), more jobs until max_batch inputs are gathered or max_wait has passed; it runs
    `run(inputs)` on the worker thread and hands each job its rows. While a batch runs, the next one gathers in the
    queue, so under load batches fill by themselves and the wait costs nothing. Without `cross_request` every
    forward pass holds one job, i.e. one request's inputs only.
    """

    def __init__(self, run, executor, *, max_batch: int, max_wait_s: float, max_queue: int, cross_request: bool,
                 metrics: dict):
        self.run, self.executor, self.metrics = run, executor, metrics
        self.max_batch, self.max_wait, self.max_queue, self.cross = max_batch, max_wait_s, max_queue, cross_request
        self.in_flight = 0  # inputs of requests accepted and not yet answered (what max_queue bounds)
        self.closing = False
        self._arrivals = 0     # chunks enqueued so far
        self._company = True   # did the last batch have company (so the next one may wait for some)?
        self._jobs = collections.deque()
        self._arrived = None
        self._task = None

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="ewq-batcher")

    async def submit(self, items: list) -> list:
        """Rows for `items` (in their order). A request larger than max_batch is cut into chunks, shortest inputs
        together, enqueued one after the other: other requests get their turn between them, and a request withdrawn
        (its task cancelled: timeout, client gone) never enqueues the rest; a queued chunk is dropped unrun."""
        if self.closing:
            raise Closed()
        if self.in_flight + len(items) > self.max_queue:
            raise Overloaded()
        self.in_flight += len(items)
        self.metrics["in_flight"].set(self.in_flight)
        try:
            out = [None] * len(items)
            for chunk in length_chunks(items, self.max_batch):
                for i, row in zip(chunk, await self._enqueue([items[i] for i in chunk])):
                    out[i] = row
            return out
        finally:
            self.in_flight -= len(items)
            self.metrics["in_flight"].set(self.in_flight)

    async def _enqueue(self, items: list) -> list:
        job = _Job(items, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._jobs.append(job)
        self._arrivals += 1
        self._arrived.set()
        try:
            return await job.future
        finally:
            if not job.future.done():  # withdrawn: the collector drops it
                job.future.cancel()

    def _next_live(self):
        while self._jobs and self._jobs[0].future.done():  # withdrawn before its turn
            self._jobs.popleft()
            self.metrics["dropped"].inc()
        return self._jobs[0] if self._jobs else None

    def _waiting(self) -> int:
        return sum(len(j.items) for j in self._jobs if not j.future.done())

    async def _wait_for(self, ready, timeout=None) -> None:
        """Until ready() (checked at every arrival) or `timeout` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not ready():
            self._arrived.clear()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take_neighbours(self, first: _Job, room: int) -> list:
        """Waiting jobs closest in length to `first` (the oldest), up to `room` inputs. A padded batch costs its
        longest input times its size, so a batch of similar lengths wastes little: on MiniLM with one thread,
        batches of 8 corpus sentences ran at 54 sentences/s sorted by length, 40 in arrival order, 35 one at a
        time. The oldest job always goes first, so no job waits for more than the batches ahead of it."""
        def length(job):
            return max(map(len, job.items))

        target, chosen = length(first), []
        for job in sorted((j for j in self._jobs if not j.future.done()),
                          key=lambda j: (abs(length(j) - target), j.enqueued)):
            if len(job.items) <= room:
                chosen.append(job)
                room -= len(job.items)
                if not room:
                    break
        picked = set(map(id, chosen))
        self._jobs = collections.deque(j for j in self._jobs if id(j) not in picked)
        return chosen

    async def _collect(self) -> None:
        while True:
            await self._wait_for(lambda: self._next_live() is not None)
            jobs, seen = [self._jobs.popleft()], self._arrivals
            n = len(jobs[0].items)
            if self.cross and n < self.max_batch:
                # company: whatever is waiting already (under load, what gathered while the last batch ran), and
                # what arrives within max_wait, if the last batch had company: requests that come one at a time
                # (one client) would only lose max_wait each, plus the wake-up of a sleeping thread on a busy machine
                room = self.max_batch - n
                if self._company:
                    await self._wait_for(lambda room=room: self._waiting() >= room, self.max_wait)
                jobs += self._take_neighbours(jobs[0], room)
            dropped = [j for j in jobs if j.future.done()]  # withdrawn while the batch gathered
            self.metrics["dropped"].inc(len(dropped))
            jobs = [j for j in jobs if not j.future.done()]
            if jobs:
                await self._run(jobs)
                self._company = len(jobs) > 1 or self._arrivals > seen  # others came while it gathered or ran

    async def _run(self, jobs: list) -> None:
        loop = asyncio.get_running_loop()
        inputs = [x for j in jobs for x in j.items]
        started = time.perf_counter()
        try:
            rows = await loop.run_in_executor(self.executor, self.run, inputs)
        except Exception as e:  # noqa: BLE001 (whatever failed, the callers are told, the collector goes on)
            if len(jobs) > 1:  # one request's input broke the pass: run each alone, so only that request fails
                for j in jobs:
                    await self._run([j])
                return
            if not jobs[0].future.done():
                jobs[0].future.set_exception(e)
            return
        m = self.metrics
        m["batch_size"].observe(len(inputs))
        m["forward"].observe(time.perf_counter() - started)
        at = 0
        for j in jobs:
            m["queue_wait"].observe(started - j.enqueued)
            if not j.future.done():
                j.future.set_result(rows[at:at + len(j.items)])
            at += len(j.items)

    async def close(self) -> None:
        """After uvicorn has let the requests in flight finish: refuse new work, fail what is left, stop."""
        self.closing = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for j in self._jobs:
            if not j.future.done():
                j.future.set_exception(Closed())
        self._jobs.clear()


# ---- errors, metrics and the outer gate ----

class APIError(Exception):
    """A request we refuse: its status, message and OpenAI's error fields; EWQ's own endpoints show the message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}
        self.type = type_ or ("server_error" if status >= 500 else "requests" if status == 429
                              else "invalid_request_error")


class Abandoned(Exception):
    """The client went away before its answer: nobody to answer."""


def error_payload(path: str, e: APIError) -> dict:
    if path in LEGACY_PATHS:
        return {"error": e.message}
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def make_metrics():
    """A registry per app (several apps in one process, as in tests, must not share prometheus' global one)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    r = CollectorRegistry()
    short = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
    return r, {
        "requests": Counter("ewq_http_requests", "HTTP requests by route and status (499: the client went away)",
                            ["route", "status"], registry=r),
        "latency": Histogram("ewq_http_request_duration_seconds", "time from request to answer, by route", ["route"],
                             registry=r, buckets=short[2:] + (10, 30, 60)),
        "batch_size": Histogram("ewq_batch_size", "inputs per forward pass", registry=r,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        "queue_wait": Histogram("ewq_queue_wait_seconds", "time a chunk waited before its forward pass started",
                                registry=r, buckets=short),
        "forward": Histogram("ewq_forward_seconds", "forward pass time per batch (tokenizer included)", registry=r,
                             buckets=short),
        "in_flight": Gauge("ewq_inputs_in_flight", "inputs accepted and not yet answered (bounded by --max-queue)",
                           registry=r),
        "dropped": Counter("ewq_dropped_chunks", "queued chunks dropped unrun because their request was withdrawn",
                           registry=r),
        "abandoned": Counter("ewq_abandoned_requests", "requests given up before their answer", ["reason"], registry=r),
        "tokens": Counter("ewq_tokens", "tokens read (prompt) and generated (completion)", ["kind"], registry=r),
    }


def route_label(path: str) -> str:
    """A bounded label set: unknown paths (scanners) all count as `other`."""
    known = ("/v1/embeddings", "/v1/completions", "/v1/models", "/embed", "/generate", "/models/active", "/health",
             "/metrics")
    return path if path in known else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class BodyTooLarge(Exception):
    """The body passed --max-body-bytes while it arrived (sent chunked, without Content-Length)."""


DRAIN_BYTES, DRAIN_S = 64 << 20, 10.0  # what we read and discard of a refused body before answering


async def drain(receive, limit: int = DRAIN_BYTES) -> None:
    """Read and discard the rest of a request body we refuse. A server that answers and closes while body bytes are
    still unread makes the kernel reset the connection, and the client may lose the answer with it (a 413 turns
    into 'connection reset'); uvicorn closes as soon as the answer is sent, so the reading happens before.
    Bounded: at most `limit` bytes and DRAIN_S seconds, then the client gets the answer and the close as they come."""
    deadline, seen = time.monotonic() + DRAIN_S, 0
    while seen <= limit and time.monotonic() < deadline:
        try:
            message = await asyncio.wait_for(receive(), deadline - time.monotonic())
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


class Gate:
    """The outermost ASGI layer, around FastAPI: what every request passes, whichever route it reaches or fails to
    reach. The API key is checked first (hmac.compare_digest: no timing hint). The body is limited here, in our
    error shape: a declared Content-Length over the limit is refused before the app runs, a body sent chunked is
    counted as it arrives (FastAPI's max_body_size counts too, but answers a declared one in plain text, and neither
    reads the rest of a refused body: see `drain`). Every request is counted by route and status and timed. While
    draining (after SIGTERM) every answer carries `Connection: close`: uvicorn closes the connection after it
    anyway, and a client told so opens a new one instead of sending on a closing socket."""

    def __init__(self, app, metrics: dict, settings: ServeSettings):
        self.app, self.metrics = app, metrics
        self.key = settings.api_key.encode() if settings.api_key else None
        self.max_body = settings.max_body_bytes
        self.draining = False

    def too_large(self) -> APIError:
        return APIError(413, f"request body over {self.max_body} bytes; send fewer or shorter inputs",
                        code="request_too_large", headers={"connection": "close"})

    async def reply(self, send, path: str, error: APIError) -> None:
        body = json.dumps(error_payload(path, error)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started, status = scope["path"], time.perf_counter(), [499]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = message.get("headers", [])
                if self.draining and not any(k.lower() == b"connection" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    if message.get("more_body"):
                        await drain(receive)
                    raise BodyTooLarge()
            return message

        try:
            headers = dict(scope["headers"])
            if self.key and path not in OPEN_PATHS:
                auth = headers.get(b"authorization", b"")
                token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(token, self.key):
                    await drain(receive, self.max_body)
                    return await self.reply(counted_send, path, APIError(
                        401, "missing or incorrect API key: send the header Authorization: Bearer <key>",
                        code="invalid_api_key", headers={"www-authenticate": "Bearer"}))
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body:
                if int(length) <= DRAIN_BYTES:
                    await drain(receive)
                return await self.reply(counted_send, path, self.too_large())
            await self.app(scope, limited_receive, counted_send)
        finally:
            route = route_label(path)
            self.metrics["requests"].labels(route, str(status[0])).inc()
            self.metrics["latency"].labels(route).observe(time.perf_counter() - started)


# ---- the app ----

def parse_body(raw: bytes):
    """The JSON object a client sent; anything else is a 400 (never a 5xx: deep nesting included)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8; send UTF-8 encoded JSON") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def embedding_request(data: dict, service: Service) -> tuple:
    """(inputs, encoding_format) of a /v1/embeddings body, or a 400 saying what is wrong."""
    inputs = data.get("input")
    if inputs is None:
        raise APIError(400, "missing required parameter 'input' (a string or a list of strings)", "input",
                       "missing_required_parameter")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise APIError(400, "input must be a non-empty string or a non-empty list of strings", "input")
    if all(is_int(x) for x in inputs) or all(isinstance(x, list) and x and all(is_int(t) for t in x) for x in inputs):
        raise APIError(400, TOKEN_IDS_REFUSED, "input", "token_ids_not_supported")
    for i, x in enumerate(inputs):
        if not isinstance(x, str):
            raise APIError(400, f"input[{i}] is not a string", "input")
        if not x:
            raise APIError(400, f"input[{i}] is an empty string; send text", "input")
        if not utf8_able(x):
            raise APIError(400, f"input[{i}] is not valid Unicode (it holds a lone surrogate escape)", "input")
    if len(inputs) > service.max_inputs:
        raise APIError(400, f"{len(inputs)} inputs in one request; send at most {service.max_inputs}", "input")
    fmt = data.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "encoding_format must be 'float' or 'base64'", "encoding_format")
    dims = data.get("dimensions")
    if dims is not None and (not is_int(dims) or dims != service.dim):
        raise APIError(400, f"this model makes {service.dim}-dimensional embeddings and does not shorten them; "
                            f"leave out dimensions or send {service.dim}", "dimensions")
    return inputs, fmt


def completion_request(data: dict, service: Service) -> tuple:
    """(prompts as token id lists, max_tokens, stop) of a /v1/completions body, or a 400 saying what is wrong."""
    if data.get("stream"):
        raise APIError(400, "stream: true is not supported; this server answers whole completions", "stream")
    unsupported = {"n": data.get("n") not in (None, 1), "best_of": data.get("best_of") not in (None, 1),
                   "echo": data.get("echo") not in (None, False), "logprobs": data.get("logprobs") is not None,
                   "suffix": data.get("suffix") not in (None, "")}
    for name, refused in unsupported.items():
        if refused:
            raise APIError(400, f"{name}={json.dumps(data[name])[:40]} is not supported (greedy decoding, one choice "
                                f"per prompt, no logprobs, echo or suffix)", name)
    prompt = data.get("prompt")
    if prompt is None:
        raise APIError(400, "missing required parameter 'prompt' (a string or a list of strings)", "prompt",
                       "missing_required_parameter")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise APIError(400, "prompt must be a non-empty string or a non-empty list of strings", "prompt")
    if all(is_int(x) for x in prompts) or all(isinstance(x, list) and all(is_int(t) for t in x) for x in prompts):
        raise APIError(400, TOKEN_IDS_REFUSED.replace("input holds", "prompt holds"), "prompt", "token_ids_not_supported")
    if len(prompts) > service.max_inputs:
        raise APIError(400, f"{len(prompts)} prompts in one request; send at most {service.max_inputs}", "prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise APIError(400, f"prompt[{i}] must be a non-empty string", "prompt")
        if not utf8_able(p):
            raise APIError(400, f"prompt[{i}] is not valid Unicode (it holds a lone surrogate escape)", "prompt")
    max_tokens = data.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not is_int(max_tokens) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise APIError(400, f"max_tokens must be an integer from 1 to {MAX_NEW_TOKENS}", "max_tokens")
    stop = data.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s and utf8_able(s)
                                                                    for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    ids = [service.tokenizer(p).input_ids for p in prompts]
    for i, x in enumerate(ids):
        if not x:
            raise APIError(400, f"prompt[{i}] has no tokens", "prompt")
        if len(x) > service.max_prompt_tokens or len(x) + max_tokens > service.context:
            raise APIError(400, f"prompt[{i}] is {len(x)} tokens; with max_tokens {max_tokens} it must fit the "
                                f"model's context of {service.context} tokens (prompts at most "
                                f"{service.max_prompt_tokens})", "prompt", "context_length_exceeded")
    return ids, max_tokens, stop


def create_app(service: Service, settings: ServeSettings | None = None):
    """The ASGI app: FastAPI routes inside the Gate. The returned Gate has `.draining` (set on SIGTERM) and
    `.registry` (its Prometheus metrics)."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import asynccontextmanager

    import numpy as np
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    settings = settings or ServeSettings()
    registry, m = make_metrics()
    model_id = settings.model_name or service.info["name"]
    aliases = {model_id, service.info["name"], str(service.path), service.info["path"]}
    created = int(time.time())
    policy = dict(service.batching)
    if settings.cross_batch != "auto" and service.kind == "encoder":
        policy.update(cross_request=settings.cross_batch == "on", why=f"--cross-batch {settings.cross_batch} "
                      f"(the model's own policy: {service.batching['why']})")
    policy.update(max_batch=settings.max_batch if service.kind == "encoder" else None,
                  max_wait_ms=settings.max_wait_ms if policy["cross_request"] else None)
    info = {**service.info, "id": model_id, "batching": policy,
            "limits": {"max_inputs": service.max_inputs, "max_body_bytes": settings.max_body_bytes,
                       "max_queue": settings.max_queue, "timeout_s": settings.timeout_s,
                       "api_key_required": bool(settings.api_key)}}
    threads = settings.threads
    worker = ThreadPoolExecutor(1, "ewq-model", initializer=set_threads if threads else None,
                                initargs=(threads,) if threads else ())
    run = functools.partial(service.embed_rows, grouped=policy["cross_request"])
    batcher = Batcher(run, worker, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                      max_queue=settings.max_queue, cross_request=policy["cross_request"], metrics=m)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(worker, service.warm_up)
        if service.kind == "encoder":
            batcher.start()
        yield
        await batcher.close()  # uvicorn calls this after the requests in flight have finished
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="EWQ model service", description=__doc__.split("\n\n")[0], lifespan=lifespan)
    gate = Gate(app, m, settings)
    gate.registry, gate.info = registry, info

    def answer(request, e: APIError):
        return JSONResponse(status_code=e.status, content=error_payload(request.url.path, e), headers=e.headers)

    @app.exception_handler(APIError)
    async def refused(request, e):
        return answer(request, e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # 404 unknown paths, 405 wrong methods
        return answer(request, APIError(e.status_code, str(e.detail),
                                        code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code)))

    @app.exception_handler(BodyTooLarge)  # raised in the app by the Gate's receive, so it is answered here
    async def too_large(request, e):
        return answer(request, gate.too_large())

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        return answer(request, APIError(400, "the request is not what this endpoint takes"))

    @app.exception_handler(ClientDisconnect)
    async def gone(request, e):  # the client left while sending its body: nobody to answer
        m["abandoned"].labels("disconnect").inc()
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request, e):  # a bug of ours: one line, never a traceback to the client
        return answer(request, APIError(500, f"internal error ({type(e).__name__}); the server keeps serving"))

    async def read_json(request: Request) -> dict:
        return parse_body(await request.body())

    async def disconnected(request: Request) -> None:
        """Returns when the client goes away: once the body is read, uvicorn's receive() waits for exactly that."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def guarded(request: Request, work):
        """Await `work` unless the client goes away (Abandoned) or --timeout passes (503); either way `work` is
        cancelled, which withdraws its queued chunks and stops a generation at its next token."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watch}, timeout=settings.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
        if task in done:
            try:
                return task.result()
            except Overloaded:
                raise APIError(429, f"the server is busy ({settings.max_queue} inputs waiting); retry shortly",
                               code="rate_limit_exceeded", headers={"retry-after": "1"}) from None
            except Closed:
                raise APIError(503, "the server is shutting down", code="shutting_down",
                               headers={"connection": "close"}) from None
        if watch in done:
            m["abandoned"].labels("disconnect").inc()
            raise Abandoned()
        m["abandoned"].labels("timeout").inc()
        raise APIError(503, f"the request did not finish within {settings.timeout_s:g} s (--timeout)",
                       code="timeout", headers={"x-should-retry": "false"})

    @app.exception_handler(Abandoned)
    async def abandoned(request, e):
        return Response(status_code=499)

    def check_model(data: dict) -> None:
        name = data.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "missing required parameter 'model'", "model", "missing_required_parameter")
        if name not in aliases:
            raise APIError(404, f"the model '{name[:200]}' does not exist here; this server serves '{model_id}'",
                           "model", "model_not_found")

    def check_kind(kind: str, instead: str) -> None:
        if service.kind != kind:
            raise APIError(400, f"'{model_id}' is {'an encoder' if service.kind == 'encoder' else 'a decoder'}; "
                                f"use {instead}", "model", "wrong_model_kind")

    async def on_worker(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    @app.get("/health")
    def health():
        if gate.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")  # a route, not a mount: a mount answers /metrics with a redirect to /metrics/
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models/active")
    def models_active():
        return info

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ewq"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str):
        if name not in aliases:
            raise APIError(404, f"the model '{name[:200]}' does not exist here; this server serves '{model_id}'",
                           "model", "model_not_found")
        return model_card()

    async def embed_rows(request, inputs):
        return await guarded(request, batcher.submit(inputs))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        data = await read_json(request)
        check_kind("encoder", "/v1/completions")
        check_model(data)
        inputs, fmt = embedding_request(data, service)
        rows = await embed_rows(request, inputs)
        tokens = sum(n for _, n, _ in rows)
        m["tokens"].labels("prompt").inc(tokens)
        encode = ((lambda v: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii"))
                  if fmt == "base64" else (lambda v: v.tolist()))
        cut = [i for i, (_, _, t) in enumerate(rows) if t]
        out = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                                          for i, (v, _, _) in enumerate(rows)],
               "model": model_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "truncated": cut}
        if cut:
            out["note"] = truncation_note(len(cut), service.embedder.max_length).replace("sentence(s)", "input(s)")
        return JSONResponse(out)

    @app.post("/v1/completions")
    async def completions(request: Request):
        data = await read_json(request)
        check_kind("decoder", "/v1/embeddings")
        check_model(data)
        prompts, max_tokens, stop = completion_request(data, service)
        if batcher.in_flight + len(prompts) > settings.max_queue:
            raise APIError(429, f"the server is busy ({settings.max_queue} prompts waiting); retry shortly",
                           code="rate_limit_exceeded", headers={"retry-after": "1"})

        async def run_all():
            batcher.in_flight += len(prompts)
            m["in_flight"].set(batcher.in_flight)
            cancel = threading.Event()
            try:
                return [await on_worker(service.complete, ids, max_tokens, stop, cancel) for ids in prompts]
            finally:
                cancel.set()  # withdrawn: the running generation stops at its next token, queued ones never start
                batcher.in_flight -= len(prompts)
                m["in_flight"].set(batcher.in_flight)

        results = await guarded(request, run_all())
        prompt_tokens, new_tokens = sum(map(len, prompts)), sum(r["tokens"] for r in results)
        m["tokens"].labels("prompt").inc(prompt_tokens)
        m["tokens"].labels("completion").inc(new_tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id, "choices": [{"text": r["text"], "index": i, "logprobs": None,
                                                "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                          "total_tokens": prompt_tokens + new_tokens}}

    @app.post("/embed")
    async def embed_route(request: Request):
        try:
            data = await read_json(request)
            if "sentences" not in data:
                raise EWQError('give {"sentences": ["...", ...]}')
            sentences = service.check_sentences(data["sentences"])
        except EWQError as e:
            raise APIError(400, str(e)) from None
        return JSONResponse(service.embed_answer(await embed_rows(request, sentences)))

    @app.post("/generate")
    async def generate_route(request: Request):
        data = await read_json(request)
        try:
            return await guarded(request, on_worker(service.generate, data.get("prompt"), data.get("max_new_tokens", 32)))
        except EWQError as e:
            raise APIError(400, str(e)) from None

    return gate


def set_threads(n: int) -> None:
    """torch's intra-op threads for the calling thread's work (the model worker calls it when it starts)."""
    import torch

    torch.set_num_threads(n)


def main(argv=None):
    from .source import DEFAULT_MODEL, DEFAULT_MODELS_DIR, ENCODER_MODEL

    defaults = ServeSettings()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = ArgumentParser(prog="python -m ewq.serve", description=__doc__.split("\n\n")[0] + " See the module docstring "
                       "or README for the endpoints.")
    p.add_argument("--model", required=True,
                   help=f"the model directory to serve: one saved by benchmark.py --save (loaded quantized), a float "
                        f"checkpoint, or '{ENCODER_MODEL}' / '{DEFAULT_MODEL}' (the embedded models)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network: "
                        "give it an --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where embedded/fetched models live")
    p.add_argument("--model-name", default=None,
                   help="the model id in the /v1 answers, and the name /v1 requests must give (default: the "
                        "directory's name; its path is accepted too)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every endpoint except /health (401 otherwise); "
                        "default: the environment variable EWQ_API_KEY, else no key (anyone who reaches the port)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help=f"inputs per batch (default {defaults.max_batch}); requests are gathered up to it (split into "
                        f"forward passes of similar lengths), and larger requests are cut into chunks of it. 1: every "
                        f"input alone")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                   help=f"how long a batch waits for more requests to join it when the model is idle (default "
                        f"{defaults.max_wait_ms:g}; under load batches fill while the previous one runs; skipped while "
                        f"requests come one at a time)")
    p.add_argument("--cross-batch", choices=("auto", "on", "off"), default="auto",
                   help="may different requests share a forward pass? auto (default): only where a sentence's vector "
                        "does not depend on its batch-mates (not for per-tensor int8 activations: torch dynamic "
                        "int8, bitsandbytes LLM.int8); off: each request's inputs alone (exact, slower under load); "
                        "on: always")
    p.add_argument("--max-inputs", type=int, default=MAX_SENTENCES,
                   help=f"inputs (sentences, prompts) per request (default {MAX_SENTENCES}; more: 400)")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="tokens per input: longer sentences are embedded from their first tokens and the answer "
                        "says which (`truncated`); longer prompts are refused (default and ceiling: the model's limit)")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                   help=f"largest request body, counted also when sent chunked (default {defaults.max_body_bytes}; "
                        f"more: 413)")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help=f"inputs accepted and not yet answered; a request that would pass it gets 429 with "
                        f"Retry-After (default {defaults.max_queue}; at least --max-inputs)")
    p.add_argument("--timeout", type=float, default=defaults.timeout_s,
                   help=f"seconds a request may take, queue included; then 503 with x-should-retry: false and its "
                        f"queued work is dropped (default {defaults.timeout_s:g})")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds the requests in flight get to finish before they are cancelled "
                        "(default 30)")
    p.add_argument("--threads", type=int, default=cores,
                   help=f"torch intra-op threads of the model worker (default: all {cores} cores this process may "
                        f"use). On a machine busy with other work fewer (even 1) can be faster: threads that wait "
                        f"for a core stall every operation")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        raise EWQError(f"--port must be between 1 and 65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-inputs", args.max_inputs),
                        ("--max-body-bytes", args.max_body_bytes), ("--threads", args.threads),
                        ("--max-input-tokens", args.max_input_tokens or 1)):
        if value < 1:
            raise EWQError(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--max-wait-ms", args.max_wait_ms), ("--timeout", args.timeout),
                        ("--graceful-timeout", args.graceful_timeout)):
        if not value >= 0 or value == float("inf"):
            raise EWQError(f"{flag} must be a finite number of at least 0, got {value}")
    if args.max_queue < args.max_inputs:
        raise EWQError(f"--max-queue ({args.max_queue}) must be at least --max-inputs ({args.max_inputs}): "
                       f"a full-size request would never be accepted")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_body_bytes=args.max_body_bytes, timeout_s=args.timeout,
                             api_key=args.api_key or os.environ.get("EWQ_API_KEY") or None,
                             model_name=args.model_name, cross_batch=args.cross_batch, threads=args.threads)
    from .device import pick_device

    listener = bind(args.host, args.port)  # before the model loads: a busy port costs a second, not the load
    set_threads(args.threads)
    service = Service(args.model, args.models_dir, pick_device(args.device), args.max_inputs, args.max_input_tokens)
    import uvicorn

    gate = create_app(service, settings)
    info, batching = gate.info, gate.info["batching"]
    print(f"serving {info['name']} as '{info['id']}' ({info['kind']}, is_quantized {json.dumps(info['is_quantized'])}) "
          f"on http://{args.host}:{args.port}  (GET /models/active /v1/models /health /metrics, POST "
          f"{'/embed /v1/embeddings' if info['kind'] == 'encoder' else '/generate /v1/completions'}); "
          f"{args.threads} thread(s)", flush=True)
    print(f"batching: {'requests share forward passes of up to ' + str(settings.max_batch) + ' inputs' if batching['cross_request'] else 'each request on its own'} "
          f"({batching['why']})", flush=True)
    if not settings.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {args.host} is reachable from other machines and no --api-key is set: anyone who reaches "
              f"the port can use the model", flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: answers in flight get Connection: close
            gate.draining = True
            super().handle_exit(sig, frame)

    import signal

    # uvicorn re-raises the signal that stopped it once it has shut down; with the default handlers that kills the
    # process after a clean, graceful shutdown (exit -15): a no-op handler lets main return 0 instead
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    Server(uvicorn.Config(gate, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout,
                          lifespan="on")).run(sockets=[listener])
    print("stopped", flush=True)


def bind(host: str, port: int):
    """The listening socket uvicorn will serve on. Made with IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets
    whose proto says TCP (accepted sockets inherit it), and without it every keep-alive answer (headers and body
    written separately) waited ~40 ms for the client's delayed ACK."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise EWQError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host, choose another --port, "
                       f"or stop what holds it") from None
    return sock


if __name__ == "__main__":
    sys.exit(run_cli(main))
