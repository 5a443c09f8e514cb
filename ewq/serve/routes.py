"""The endpoints of one served model: EWQ's own (/embed, /generate, /models/active), the OpenAI ones (/v1/...), the
probes (/health, /metrics); each request's work runs on the model worker, withdrawn if its client goes away or
--timeout passes."""

import asyncio
import threading
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..common import EWQError
from .batcher import Closed, Overloaded
from .errors import Abandoned, APIError, parse_body
from .shapes import completion, completion_request, embedding_list, embedding_request, model_card


class Routes:
    """What the endpoints share: the service, its settings, the batcher and worker, the metrics, and the Gate (whose
    `draining` /health reports). `add_to(app)` registers them."""

    def __init__(self, service, settings, info: dict, batcher, worker, metrics: dict, registry, gate):
        self.service, self.settings, self.info, self.batcher, self.worker = service, settings, info, batcher, worker
        self.m, self.registry, self.gate = metrics, registry, gate
        self.model_id = info["id"]
        self.aliases = {self.model_id, service.info["name"], str(service.path), service.info["path"]}
        self.created = int(time.time())

    def add_to(self, app) -> None:
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)  # a route, not a mount: a mount answers /metrics with a redirect to /metrics/
        app.get("/models/active")(self.models_active)
        app.get("/v1/models")(self.list_models)
        app.get("/v1/models/{name:path}")(self.get_model)
        app.post("/v1/embeddings")(self.embeddings)
        app.post("/v1/completions")(self.completions)
        app.post("/embed")(self.embed)
        app.post("/generate")(self.generate)

    # ---- what every route uses ----

    def unknown_model(self, name: str) -> APIError:
        return APIError(404, f"the model '{name[:200]}' does not exist here; this server serves '{self.model_id}'",
                        "model", "model_not_found")

    def check_model(self, data: dict) -> None:
        name = data.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "missing required parameter 'model'", "model", "missing_required_parameter")
        if name not in self.aliases:
            raise self.unknown_model(name)

    def check_kind(self, kind: str, instead: str) -> None:
        if self.service.kind != kind:
            raise APIError(400, f"'{self.model_id}' is {'an encoder' if self.service.kind == 'encoder' else 'a decoder'}; "
                                f"use {instead}", "model", "wrong_model_kind")

    async def on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    @staticmethod
    async def read_json(request: Request) -> dict:
        return parse_body(await request.body())

    @staticmethod
    async def disconnected(request: Request) -> None:
        """Returns when the client goes away: once the body is read, uvicorn's receive() waits for exactly that."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def guarded(self, request: Request, work):
        """Await `work` unless the client goes away (Abandoned) or --timeout passes (503); either way `work` is
        cancelled, which withdraws its queued chunks and stops a generation at its next token."""
        settings = self.settings
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self.disconnected(request))
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
            self.m["abandoned"].labels("disconnect").inc()
            raise Abandoned()
        self.m["abandoned"].labels("timeout").inc()
        raise APIError(503, f"the request did not finish within {settings.timeout_s:g} s (--timeout)",
                       code="timeout", headers={"x-should-retry": "false"})

    async def embed_rows(self, request, inputs):
        return await self.guarded(request, self.batcher.submit(inputs))

    # ---- the probes and the model's facts ----

    def health(self):
        if self.gate.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def models_active(self):
        return self.info

    def list_models(self):
        return {"object": "list", "data": [model_card(self.model_id, self.created)]}

    def get_model(self, name: str):
        if name not in self.aliases:
            raise self.unknown_model(name)
        return model_card(self.model_id, self.created)

    # ---- the OpenAI endpoints ----

    async def embeddings(self, request: Request):
        data = await self.read_json(request)
        self.check_kind("encoder", "/v1/completions")
        self.check_model(data)
        inputs, fmt = embedding_request(data, self.service)
        rows = await self.embed_rows(request, inputs)
        out = embedding_list(rows, self.model_id, fmt, self.service.embedder.max_length)
        self.m["tokens"].labels("prompt").inc(out["usage"]["prompt_tokens"])
        return JSONResponse(out)

    async def completions(self, request: Request):
        data = await self.read_json(request)
        self.check_kind("decoder", "/v1/embeddings")
        self.check_model(data)
        prompts, max_tokens, stop = completion_request(data, self.service)
        max_queue = self.settings.max_queue
        if self.batcher.in_flight + len(prompts) > max_queue:
            raise APIError(429, f"the server is busy ({max_queue} prompts waiting); retry shortly",
                           code="rate_limit_exceeded", headers={"retry-after": "1"})
        results = await self.guarded(request, self.complete_all(prompts, max_tokens, stop))
        out = completion(results, sum(map(len, prompts)), self.model_id)
        self.m["tokens"].labels("prompt").inc(out["usage"]["prompt_tokens"])
        self.m["tokens"].labels("completion").inc(out["usage"]["completion_tokens"])
        return out

    async def complete_all(self, prompts: list, max_tokens: int, stop: list) -> list:
        """Each prompt's completion, one after the other on the worker; counted in flight (what --max-queue bounds)."""
        batcher, m = self.batcher, self.m
        batcher.in_flight += len(prompts)
        m["in_flight"].set(batcher.in_flight)
        cancel = threading.Event()
        try:
            return [await self.on_worker(self.service.complete, ids, max_tokens, stop, cancel) for ids in prompts]
        finally:
            cancel.set()  # withdrawn: the running generation stops at its next token, queued ones never start
            batcher.in_flight -= len(prompts)
            m["in_flight"].set(batcher.in_flight)

    # ---- EWQ's own endpoints ----

    async def embed(self, request: Request):
        try:
            data = await self.read_json(request)
            if "sentences" not in data:
                raise EWQError('give {"sentences": ["...", ...]}')
            sentences = self.service.check_sentences(data["sentences"])
        except EWQError as e:
            raise APIError(400, str(e)) from None
        return JSONResponse(self.service.embed_answer(await self.embed_rows(request, sentences)))

    async def generate(self, request: Request):
        data = await self.read_json(request)
        try:
            return await self.guarded(request, self.on_worker(self.service.generate, data.get("prompt"),
                                                              data.get("max_new_tokens", 32)))
        except EWQError as e:
            raise APIError(400, str(e)) from None
