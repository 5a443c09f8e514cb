"""The ASGI app: a served model's facts and batching policy, its worker thread and batcher, FastAPI with the Routes
and the error handlers that answer in our shapes, all inside the Gate."""

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from .batcher import Batcher
from .errors import Abandoned, APIError, BodyTooLarge, error_payload
from .gate import Gate
from .limits import ServeSettings
from .metrics import make_metrics
from .model import set_threads

SUMMARY = "Serve one model over HTTP (FastAPI + uvicorn): EWQ's own endpoints and OpenAI-compatible ones."


def served_info(service, settings: ServeSettings) -> dict:
    """/models/active: the model's facts, the id it is served as, how its requests are batched (--cross-batch may
    overrule the model's own policy) and the limits."""
    policy = dict(service.batching)
    if settings.cross_batch != "auto" and service.kind == "encoder":
        policy.update(cross_request=settings.cross_batch == "on", why=f"--cross-batch {settings.cross_batch} "
                      f"(the model's own policy: {service.batching['why']})")
    policy.update(max_batch=settings.max_batch if service.kind == "encoder" else None,
                  max_wait_ms=settings.max_wait_ms if policy["cross_request"] else None)
    return {**service.info, "id": settings.model_name or service.info["name"], "batching": policy,
            "limits": {"max_inputs": service.max_inputs, "max_body_bytes": settings.max_body_bytes,
                       "max_queue": settings.max_queue, "timeout_s": settings.timeout_s,
                       "api_key_required": bool(settings.api_key)}}


def answer(request, e: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=e.status, content=error_payload(request.url.path, e), headers=e.headers)


def add_error_handlers(app, gate: Gate, m: dict) -> None:
    """Every failure a request can meet, answered in the shape of its endpoint: never a traceback, never a 5xx for
    anything a client sends."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

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

    @app.exception_handler(Abandoned)
    async def abandoned(request, e):
        return Response(status_code=499)


def create_app(service, settings: ServeSettings | None = None):
    """The ASGI app: FastAPI routes inside the Gate. The returned Gate has `.draining` (set on SIGTERM) and
    `.registry` (its Prometheus metrics)."""
    from fastapi import FastAPI

    from .routes import Routes

    settings = settings or ServeSettings()
    registry, m = make_metrics()
    info = served_info(service, settings)
    cross = info["batching"]["cross_request"]
    threads = settings.threads
    worker = ThreadPoolExecutor(1, "ewq-model", initializer=set_threads if threads else None,
                                initargs=(threads,) if threads else ())
    batcher = Batcher(functools.partial(service.embed_rows, grouped=cross), worker, max_batch=settings.max_batch,
                      max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.max_queue, cross_request=cross,
                      metrics=m)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(worker, service.warm_up)
        if service.kind == "encoder":
            batcher.start()
        yield
        await batcher.close()  # uvicorn calls this after the requests in flight have finished
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="EWQ model service", description=SUMMARY, lifespan=lifespan)
    gate = Gate(app, m, settings)
    gate.registry, gate.info = registry, info
    add_error_handlers(app, gate, m)
    Routes(service, settings, info, batcher, worker, m, registry, gate).add_to(app)
    return gate
