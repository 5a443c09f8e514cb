"""The loaded model: what it is (`active_info`), whether requests may share a forward pass (`batching_policy`), and
the Service that runs it (on the worker thread when served over HTTP)."""

import dataclasses
import threading
from pathlib import Path

from ..common import EWQError
from .batcher import length_chunks, length_groups
from .limits import MAX_NEW_TOKENS, MAX_SENTENCES, truncation_note, utf8_able


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
    if method == "ewq-onnxruntime" and has_8bit:
        return policy(False, "ONNX Runtime's dynamic int8 (DynamicQuantizeLinear) quantizes each layer's input with one "
                             "scale and zero point per tensor, i.e. per batch: a sentence's vector would depend on the "
                             "other requests in its forward pass, so each request's inputs run on their own")
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
class ExportedEncoder:
    """What the service reads of a checkpoint, for an ONNX export (no safetensors): its config and block count."""
    config: dict
    kind: str = "encoder"
    architecture: str = "onnx"
    blocks: tuple = ()

    @classmethod
    def of(cls, path: Path) -> "ExportedEncoder":
        import json

        try:
            config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EWQError(f"{path}/config.json is missing or not JSON ({e}); export the model again") from None
        arch = (config.get("architectures") or [config.get("model_type", "encoder")])[0]
        return cls(config, architecture=f"{arch} (ONNX, ONNX Runtime)",
                   blocks=tuple(range(int(config.get("num_hidden_layers") or 0))))


class Service:
    """The loaded model and what running it needs. The HTTP layer runs every model call on one worker thread; the
    lock only guards direct callers (tests, scripts) from running it twice at once."""

    def __init__(self, model_spec: str, models_dir: str = "models", device: str = "cpu",
                 max_inputs: int = MAX_SENTENCES, max_input_tokens: int | None = None):
        from ..apply import load_model
        from ..artifact import load_quantized, read_metadata
        from ..checkpoint import open_checkpoint
        from ..device import pick_dtype
        from ..onnx_export import onnx_file
        from ..source import ModelSource, load_tokenizer, resolve_model

        exported = onnx_file(model_spec) if Path(model_spec).is_dir() else None  # python -m ewq.export onnx's
        # directory (no safetensors): ONNX Runtime runs it
        source = ModelSource(Path(model_spec).name, Path(model_spec)) if exported else resolve_model(model_spec, models_dir)
        self.path, self.device, self.max_inputs = source.path, device, max_inputs
        self.ckpt = ExportedEncoder.of(source.path) if exported else open_checkpoint(source.path)
        self.kind = self.ckpt.kind
        self.tokenizer = load_tokenizer(source.path)
        meta = read_metadata(source.path)
        if exported:
            from ..backends.onnxruntime import OrtEncoder

            self.model = OrtEncoder(exported)  # intra-op threads: torch's, which --threads set
        elif meta and meta.get("is_quantized"):
            self.model = load_quantized(source.path, self.kind)[0]
        else:
            # a float checkpoint runs in the benchmarks' default dtype for its kind and device
            self.model = load_model(source.path, pick_dtype(None, device, "", self.kind), self.kind)
        self.model.to(device)
        self.info = active_info(source.path, self.ckpt, meta)
        self.batching = batching_policy(meta, self.kind)
        config = self.ckpt.config
        if self.kind == "encoder":
            from ..embed import Embedder

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
        from ..embed import check_sentences

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
        from ..generate import encode_prompt, generate_exact

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


def set_threads(n: int) -> None:
    """torch's intra-op threads for the calling thread's work (the model worker calls it when it starts)."""
    import torch

    torch.set_num_threads(n)

