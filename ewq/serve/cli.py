"""`python -m ewq.serve`: the flags and their checks, the listening socket, and the server's life from start-up to a
graceful stop."""

import json
import os

from ..common import ArgumentParser, EWQError
from .app import SUMMARY, create_app
from .limits import MAX_SENTENCES, ServeSettings
from .model import Service, set_threads


def parser() -> ArgumentParser:
    from ..source import DEFAULT_MODEL, DEFAULT_MODELS_DIR, ENCODER_MODEL

    defaults = ServeSettings()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = ArgumentParser(prog="python -m ewq.serve", description=SUMMARY + " See the module docstring "
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
                   help=f"torch intra-op threads of the model worker, ONNX Runtime's for an ONNX export (default: "
                        f"all {cores} cores this process may "
                        f"use). On a machine busy with other work fewer (even 1) can be faster: threads that wait "
                        f"for a core stall every operation")
    return p


def settings_of(args) -> ServeSettings:
    """What the HTTP layer is to enforce, once every flag has been checked (before anything loads)."""
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
    return ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_body_bytes=args.max_body_bytes, timeout_s=args.timeout,
                         api_key=args.api_key or os.environ.get("EWQ_API_KEY") or None,
                         model_name=args.model_name, cross_batch=args.cross_batch, threads=args.threads)


def announce(gate, settings: ServeSettings, args) -> None:
    """What is served, where, and how its requests are batched; a warning when the network may reach it keyless."""
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


def serve(gate, listener, graceful_timeout: float) -> None:
    """Serve on `listener` until SIGTERM or Ctrl-C; then the requests in flight finish (at most graceful_timeout
    seconds), answered with Connection: close."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: answers in flight get Connection: close
            gate.draining = True
            super().handle_exit(sig, frame)

    import signal

    # uvicorn re-raises the signal that stopped it once it has shut down; with the default handlers that kills the
    # process after a clean, graceful shutdown (exit -15): a no-op handler lets main return 0 instead
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    Server(uvicorn.Config(gate, log_level="warning", timeout_graceful_shutdown=graceful_timeout,
                          lifespan="on")).run(sockets=[listener])


def main(argv=None):
    args = parser().parse_args(argv)
    settings = settings_of(args)
    from ..device import pick_device

    listener = bind(args.host, args.port)  # before the model loads: a busy port costs a second, not the load
    set_threads(args.threads)
    service = Service(args.model, args.models_dir, pick_device(args.device), args.max_inputs, args.max_input_tokens)
    gate = create_app(service, settings)
    announce(gate, settings, args)
    serve(gate, listener, args.graceful_timeout)
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

