"""Stage 6: quality against the original model, on the same text windows.

Per token, on fixed non-overlapping windows of a corpus (default: lee_background.cor, real English
news prose shipped in the PyPI package gensim):
  perplexity      exp(mean negative log-likelihood of the next token), of the model measured;
  kl_mean         mean KL(original || variant) over the vocabulary. The original's distribution is kept
                  as its top-k log-probabilities; the remaining mass of both distributions is pooled into
                  one "tail" bucket. That is the KL of the coarsened distributions: a lower bound on the
                  full KL, exact when k equals the vocabulary size, and 0 exactly when variant = original;
  top1_agreement  share of positions where the variant's most likely token is the original's.
The original's top-k is computed once per (weights fingerprint, corpus, windows, dtype, k), from the
float model before any quantization, cached under benchmark_results/.reference/, and reused.

Suite agreement (`output_agreement`): greedy tokens identical to the original's before the first
divergence and overall, and ROUGE-L (LCS-based F1 over words) between the texts.
"""

import hashlib
import importlib.metadata
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .common import EWQError

DEFAULT_CORPUS = ("gensim", "gensim/test/test_data/lee_background.cor")
WINDOW = 256
TOP_K = 256
BATCH = 4


@dataclass
class Corpus:
    name: str
    sha256: str
    text: str


def load_corpus(path=None) -> Corpus:
    if path is None:
        try:
            path = Path(importlib.metadata.distribution(DEFAULT_CORPUS[0]).locate_file(DEFAULT_CORPUS[1]))
        except importlib.metadata.PackageNotFoundError:
            raise EWQError("the default corpus needs the PyPI package gensim: pip install --no-deps gensim==4.4.0 "
                           "(or pass --eval-text FILE)") from None
    path = Path(path)
    if path.is_dir():
        raise EWQError(f"corpus {path} is a folder; pass a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise EWQError(f"cannot read corpus {path}: {e.strerror or e}; pass an existing UTF-8 text file with --eval-text") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EWQError(f"corpus {path} is not UTF-8 text (invalid byte at offset {e.start}); pass a UTF-8 text file, "
                       f"or convert it, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise EWQError(f"corpus {path} is empty; pass a UTF-8 text file with real prose")
    return Corpus(path.name, hashlib.sha256(raw).hexdigest(), text)


def make_windows(tokenizer, corpus: Corpus, n_tokens: int, window: int = WINDOW, from_end: bool = False) -> torch.Tensor:
    """[n_windows, window] token ids, non-overlapping. Evaluation windows are taken from the start of the
    corpus; calibration windows (sensitivity) from the end, so the two never share text."""
    if window < 2:
        raise EWQError(f"window must be at least 2 tokens, got {window}")
    ids = _corpus_ids(tokenizer, corpus)
    available = ids.numel() // window
    wanted = max(1, math.ceil(n_tokens / (window - 1)))
    if available < 1:
        raise EWQError(f"corpus {corpus.name} has {ids.numel()} tokens, shorter than one window of {window}; "
                       f"give a longer text")
    if wanted > available:
        raise EWQError(f"corpus {corpus.name} holds {available} windows of {window} tokens, {wanted} needed for "
                       f"{n_tokens} evaluation tokens; lower --eval-tokens or give a longer text")
    chunks = ids[: available * window].view(available, window)
    return (chunks[available - wanted:] if from_end else chunks[:wanted]).clone()  # not a view of the memo


_IDS_MEMO: dict = {}


def _corpus_ids(tokenizer, corpus: Corpus) -> torch.Tensor:
    """The corpus's token ids, tokenized once per process for each tokenizer: a plan's calibration, its checks and
    every plan after it in one run read the same text (a 360 kB corpus takes 0.2-0.7 s each time). A fast
    tokenizer is known by its whole serialized state (vocabulary, merges, normalizer); a slow one is not memoized."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(corpus.text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    key = (hashlib.sha256(backend.to_str().encode()).hexdigest(), corpus.sha256)
    if key not in _IDS_MEMO:
        if len(_IDS_MEMO) >= 4:
            _IDS_MEMO.pop(next(iter(_IDS_MEMO)))
        _IDS_MEMO[key] = tokenizer(corpus.text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return _IDS_MEMO[key]


def _log_probs(model, batch: torch.Tensor, device: str) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(batch.to(device)).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def compute_reference(model, windows: torch.Tensor, device: str, top_k: int = TOP_K, progress: bool = True) -> dict:
    """The original's top-k log-probs at every predicted position."""
    values, indices, top1 = [], [], []
    for batch in tqdm(windows.split(BATCH), desc="reference logits", disable=not progress, leave=False):
        logp = _log_probs(model, batch, device)
        v, i = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        values.append(v)
        indices.append(i.to(torch.int32))
        top1.append(logp.argmax(-1).to(torch.int32))  # argmax, not topk[0]: ties must break as in evaluate()
    return {"top_logp": torch.cat(values), "top_index": torch.cat(indices), "top1": torch.cat(top1),
            "windows": windows.to(torch.int32)}


def _tail_log(mass: torch.Tensor) -> torch.Tensor:
    return torch.log(mass.clamp_min(1e-30))


def kl_to_reference(logp: torch.Tensor, top_logp: torch.Tensor, top_index: torch.Tensor) -> torch.Tensor:
    """KL(original || variant) per position, over the top-k of the original plus one pooled tail bucket."""
    lq = logp.gather(-1, top_index.long())
    p = top_logp.exp()
    kl = (p * (top_logp - lq)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - lq.exp().sum(-1)).clamp_min(0)
    return kl + torch.where(p_tail > 0, p_tail * (_tail_log(p_tail) - _tail_log(q_tail)), torch.zeros_like(p_tail))


def evaluate(model, reference: dict, device: str, progress: bool = True) -> dict:
    windows = reference["windows"].long()
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    offset = 0
    for batch in tqdm(windows.split(BATCH), desc="quality", disable=not progress, leave=False):
        logp = _log_probs(model, batch, device)
        rows = slice(offset, offset + batch.shape[0])
        offset += batch.shape[0]
        targets = batch[:, 1:]
        nll += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        kl += kl_to_reference(logp, reference["top_logp"][rows], reference["top_index"][rows]).sum().item()
        agree += (logp.argmax(-1) == reference["top1"][rows].long()).sum().item()
        n += targets.numel()
    return {"perplexity": math.exp(nll / n), "kl_mean": kl / n, "top1_agreement": agree / n, "eval_tokens": n}


# ---- the reference cache ----

def reference_key(fingerprint: str, corpus: Corpus, windows: torch.Tensor, dtype, device: str, top_k: int) -> dict:
    return {"fingerprint": fingerprint, "corpus": corpus.name, "corpus_sha256": corpus.sha256,
            "windows": int(windows.shape[0]), "window": int(windows.shape[1]), "dtype": str(dtype).replace("torch.", ""),
            "device_type": device.split(":")[0], "top_k": top_k}


def cache_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"reference_{key['fingerprint'][:12]}_{digest}.safetensors"


REFERENCE_TENSORS = {"top_logp", "top_index", "top1", "windows"}


def load_reference(path: Path, key: dict, names=REFERENCE_TENSORS):
    """The cached reference for `key` (tensors `names`), or None if there is none. A damaged or foreign file is an error."""
    if not path.exists():
        return None
    try:  # one open: the key in the header metadata, then the tensors
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads(f.metadata()["ewq_reference"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise EWQError(f"reference cache {path} is corrupt ({type(e).__name__}); delete it and run again to recompute") from None
    if stored != key:
        raise EWQError(f"reference cache {path} belongs to another model or setting (fingerprint "
                       f"{stored.get('fingerprint', '?')[:12]}); delete it and run again to recompute")
    if set(tensors) != set(names):
        raise EWQError(f"reference cache {path} is incomplete; delete it and run again to recompute")
    return tensors


def save_reference(path: Path, key: dict, reference: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ref.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in reference.items()}, tmp, metadata={"ewq_reference": json.dumps(key, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- suite agreement ----

def lcs_length(a, b) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    c, r = candidate.split(), reference.split()
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0 if (c or r) else 1.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def output_agreement(tokens, reference_tokens, text: str, reference_text: str) -> dict:
    n = min(len(tokens), len(reference_tokens))
    prefix = next((i for i in range(n) if tokens[i] != reference_tokens[i]), n)
    same = sum(a == b for a, b in zip(tokens, reference_tokens))
    total = max(len(reference_tokens), 1)
    return {"prefix_match": prefix / total, "token_match": same / total, "rouge_l": rouge_l(text, reference_text)}
