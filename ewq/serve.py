"""Serve one model over HTTP (FastAPI + uvicorn): what the user's embedding service needs.

    python -m ewq.serve --model DIR [--host 127.0.0.1] [--port 8000]

GET  /models/active   what is loaded, read from the directory's metadata.json, never guessed: a directory
                      without one says is_quantized null and metadata "missing"
POST /embed           encoders: {"sentences": [str, ...]} -> one vector per sentence, the model's own pooling
POST /generate        decoders: {"prompt": str, "max_new_tokens": int} -> greedy continuation

A bad request gets a 4xx status with {"error": "..."}; nothing a client sends produces a traceback, and the
server keeps serving. It binds to 127.0.0.1 unless told otherwise. A model saved by `benchmark.py --save`
is loaded quantized, as saved; any other directory is loaded as it is (float).
"""

import json
import sys
import threading
from pathlib import Path

from .common import ArgumentParser, EWQError, run_cli

MAX_SENTENCES = 256
MAX_NEW_TOKENS = 512


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


class Service:
    """The loaded model and what serving it needs; one request at a time runs the model."""

    def __init__(self, model_spec: str, models_dir: str = "models", device: str = "cpu"):
        from .apply import load_model
        from .artifact import load_quantized, read_metadata
        from .checkpoint import open_checkpoint
        from .device import pick_dtype
        from .source import load_tokenizer, resolve_model

        source = resolve_model(model_spec, models_dir)
        self.path, self.device = source.path, device
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
        if self.kind == "encoder":
            from .embed import Embedder

            self.embedder = Embedder.of(source.path, self.ckpt.config, self.tokenizer)
            self.info.update(pooling=self.embedder.pooling.mode, normalize=self.embedder.pooling.normalize,
                             max_length=self.embedder.max_length)
        self.lock = threading.Lock()

    def embed(self, sentences) -> dict:
        from .embed import check_sentences

        if self.kind != "encoder":
            raise EWQError(f"{self.info['name']} is a decoder; it has no sentence embeddings (use POST /generate)")
        sentences = check_sentences(sentences)
        if len(sentences) > MAX_SENTENCES:
            raise EWQError(f"{len(sentences)} sentences in one request; send at most {MAX_SENTENCES}")
        cut = self.embedder.truncated(sentences)
        with self.lock:
            vectors = self.embedder.embed(self.model, sentences, self.device)
        out = {"model": self.info["name"], "dim": int(vectors.shape[1]), "embeddings": vectors.tolist(),
               "truncated": cut}
        if cut:
            limit = self.embedder.max_length
            out["note"] = f"{len(cut)} sentence(s) longer than {limit} tokens were embedded from their first {limit} tokens"
        return out

    def generate(self, prompt, max_new_tokens) -> dict:
        from .generate import encode_prompt, generate_exact

        if self.kind != "decoder":
            raise EWQError(f"{self.info['name']} is an encoder; it does not generate text (use POST /embed)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EWQError("give a non-empty string as prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise EWQError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}")
        ids = encode_prompt(self.tokenizer, prompt)
        with self.lock:
            tokens = generate_exact(self.model, ids, max_new_tokens, self.device, clock=False)[2]
        return {"model": self.info["name"], "text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                "new_tokens": len(tokens)}


def create_app(service: Service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="EWQ model service", description=__doc__.split("\n\n")[0])

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message})

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404 for unknown paths, 405 for wrong methods: JSON too
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return error(400, "the request body is not the JSON this endpoint takes")

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # a bug of ours: say so in one line, never a traceback to the client
        return error(500, f"internal error ({type(exc).__name__}); the server keeps serving")

    async def body(request: Request) -> dict:
        raw = await request.body()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise EWQError("the request body is not UTF-8; send UTF-8 encoded JSON") from None
        except ValueError:
            raise EWQError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise EWQError("the request body must be a JSON object")
        return data

    @app.get("/models/active")
    def models_active():
        return service.info

    @app.post("/embed")
    async def embed_route(request: Request):
        try:
            data = await body(request)
            if "sentences" not in data:
                raise EWQError('give {"sentences": ["...", ...]}')
            return service.embed(data["sentences"])
        except EWQError as e:
            return error(400, str(e))

    @app.post("/generate")
    async def generate_route(request: Request):
        try:
            data = await body(request)
            return service.generate(data.get("prompt"), data.get("max_new_tokens", 32))
        except EWQError as e:
            return error(400, str(e))

    return app


def main(argv=None):
    from .source import DEFAULT_MODEL, DEFAULT_MODELS_DIR, ENCODER_MODEL

    p = ArgumentParser(prog="python -m ewq.serve", description=__doc__.split("\n\n")[0] + " See the module docstring "
                       "or README for the endpoints.")
    p.add_argument("--model", required=True,
                   help=f"the model directory to serve: one saved by benchmark.py --save (loaded quantized), a float "
                        f"checkpoint, or '{ENCODER_MODEL}' / '{DEFAULT_MODEL}' (the embedded models)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where embedded/fetched models live")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        raise EWQError(f"--port must be between 1 and 65535, got {args.port}")
    from .device import pick_device

    listener = bind(args.host, args.port)  # before the model loads: a busy port costs a second, not the load
    service = Service(args.model, args.models_dir, pick_device(args.device))
    import uvicorn

    info = service.info
    print(f"serving {info['name']} ({info['kind']}, is_quantized {json.dumps(info['is_quantized'])}) on "
          f"http://{args.host}:{args.port}  (GET /models/active, POST /{'embed' if info['kind'] == 'encoder' else 'generate'})",
          flush=True)
    uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning")).run(sockets=[listener])


def bind(host: str, port: int):
    """The listening socket uvicorn will serve on."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise EWQError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host, choose another --port, "
                       f"or stop what holds it") from None
    return sock


if __name__ == "__main__":
    sys.exit(run_cli(main))
