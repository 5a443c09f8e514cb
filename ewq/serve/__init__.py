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

from .app import create_app
from .batcher import Batcher, length_chunks, length_groups
from .cli import bind, main
from .limits import ServeSettings
from .metrics import make_metrics
from .model import Service, active_info, batching_policy

__all__ = ["Batcher", "ServeSettings", "Service", "active_info", "batching_policy", "bind", "create_app",
           "length_chunks", "length_groups", "main", "make_metrics"]
