"""What the service allows: the per-request limits, the settings the HTTP layer enforces, what counts as text and
what a cut input is told."""

import dataclasses

MAX_SENTENCES = 256        # inputs per request (--max-inputs)
MAX_NEW_TOKENS = 512       # /generate's max_new_tokens, /v1/completions' max_tokens
MAX_STOP = 4               # stop sequences per completion request, as OpenAI
DEFAULT_MAX_TOKENS = 16    # OpenAI's default max_tokens for /v1/completions


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


def utf8_able(text: str) -> bool:
    """JSON may carry lone surrogate escapes ("\\ud800"): valid JSON, not text; the tokenizer would fail on them."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def truncation_note(count: int, limit: int) -> str:
    return f"{count} sentence(s) longer than {limit} tokens were embedded from their first {limit} tokens"
