"""The refusals and their two shapes: EWQ's endpoints answer {"error": "..."}, the others OpenAI's
{"error": {"message", "type", "param", "code"}}; and the JSON body every POST must be."""

import json

LEGACY_PATHS = ("/embed", "/generate", "/models/active")  # EWQ's own endpoints keep their {"error": "..."} bodies


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


class BodyTooLarge(Exception):
    """The body passed --max-body-bytes while it arrived (sent chunked, without Content-Length)."""


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

