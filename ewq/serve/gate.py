"""The limits every request passes before any route (the API key, the body size) and the counting of every answer."""

import asyncio
import hmac
import json
import time

from .errors import APIError, BodyTooLarge, error_payload
from .limits import ServeSettings
from .metrics import route_label

OPEN_PATHS = ("/health",)  # no API key needed: a load balancer's probe has none
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

