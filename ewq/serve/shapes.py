"""The OpenAI shapes: the request bodies of /v1/embeddings and /v1/completions as pydantic models (refusals in
OpenAI's words: each names its param and, where OpenAI has one, its code) and the answers' JSON."""

import base64
import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, StrictInt, StrictStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import APIError
from .limits import DEFAULT_MAX_TOKENS, MAX_NEW_TOKENS, MAX_STOP, truncation_note, utf8_able

TOKEN_IDS_REFUSED = ("input holds token ids, not text: OpenAI clients send tiktoken ids (OpenAI's vocabulary), which "
                     "mean nothing to this model's vocabulary; send strings. langchain's OpenAIEmbeddings sends token "
                     "ids unless created with check_embedding_ctx_length=False")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def refuse(message: str, code: str = "invalid"):
    """A refusal from inside a validator, with our own message (and OpenAI's code, unless "invalid")."""
    raise PydanticCustomError(code, "{message}", {"message": message})


class OpenAIRequest(BaseModel):
    """A request body of an OpenAI endpoint: the fields this server reads, in the order they are checked (the first
    refused one is answered); others (user, temperature, ...) are ignored. Where pydantic's own checks refuse a
    field, MESSAGES says it in our words."""
    MESSAGES: ClassVar[dict] = {}

    @classmethod
    def parse(cls, data: dict, context: dict):
        try:
            return cls.model_validate(data, context=context)
        except ValidationError as e:
            error = e.errors(include_url=False)[0]
            param = str(error["loc"][0])
            if "message" in error.get("ctx", {}):  # ours (refuse)
                code = None if error["type"] == "invalid" else error["type"]
                raise APIError(400, error["ctx"]["message"], param, code) from None
            raise APIError(400, cls.MESSAGES[param](context), param) from None


class EmbeddingRequest(OpenAIRequest):
    """POST /v1/embeddings. context: max_inputs, dim (the model's vector size)."""
    input: list[str] = Field(None, validate_default=True)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    MESSAGES: ClassVar[dict] = {
        "encoding_format": lambda context: "encoding_format must be 'float' or 'base64'",
        "dimensions": lambda context: f"this model makes {context['dim']}-dimensional embeddings and does not shorten "
                                      f"them; leave out dimensions or send {context['dim']}"}

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, inputs, info):
        if inputs is None:
            refuse("missing required parameter 'input' (a string or a list of strings)", "missing_required_parameter")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            refuse("input must be a non-empty string or a non-empty list of strings")
        if all(is_int(x) for x in inputs) or all(isinstance(x, list) and x and all(is_int(t) for t in x)
                                                 for x in inputs):
            refuse(TOKEN_IDS_REFUSED, "token_ids_not_supported")
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                refuse(f"input[{i}] is not a string")
            if not x:
                refuse(f"input[{i}] is an empty string; send text")
            if not utf8_able(x):
                refuse(f"input[{i}] is not valid Unicode (it holds a lone surrogate escape)")
        if len(inputs) > info.context["max_inputs"]:
            refuse(f"{len(inputs)} inputs in one request; send at most {info.context['max_inputs']}")
        return inputs

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _float_unless_told(cls, fmt):
        return fmt or "float"

    @field_validator("dimensions")
    @classmethod
    def _the_models_own(cls, dims, info):
        if dims is not None and dims != info.context["dim"]:
            raise ValueError("not the model's dimensions")
        return dims


NOT_SUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,),
                 "suffix": (None, "")}  # the values accepted: OpenAI's defaults


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions. context: max_inputs."""
    stream: Any = None
    n: Any = None
    best_of: Any = None
    echo: Any = None
    logprobs: Any = None
    suffix: Any = None
    prompt: list[str] = Field(None, validate_default=True)
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_NEW_TOKENS)] = DEFAULT_MAX_TOKENS
    stop: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=MAX_STOP)] = []
    MESSAGES: ClassVar[dict] = {
        "max_tokens": lambda context: f"max_tokens must be an integer from 1 to {MAX_NEW_TOKENS}",
        "stop": lambda context: f"stop must be a non-empty string or a list of at most {MAX_STOP} of them"}

    @field_validator("stream", mode="before")
    @classmethod
    def _whole(cls, stream):
        if stream:
            refuse("stream: true is not supported; this server answers whole completions")
        return stream

    @field_validator(*NOT_SUPPORTED, mode="before")
    @classmethod
    def _greedy_one_choice(cls, value, info):
        if value not in NOT_SUPPORTED[info.field_name]:
            refuse(f"{info.field_name}={json.dumps(value)[:40]} is not supported (greedy decoding, one choice per "
                   f"prompt, no logprobs, echo or suffix)")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt, info):
        if prompt is None:
            refuse("missing required parameter 'prompt' (a string or a list of strings)", "missing_required_parameter")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts:
            refuse("prompt must be a non-empty string or a non-empty list of strings")
        if all(is_int(x) for x in prompts) or all(isinstance(x, list) and all(is_int(t) for t in x) for x in prompts):
            refuse(TOKEN_IDS_REFUSED.replace("input holds", "prompt holds"), "token_ids_not_supported")
        if len(prompts) > info.context["max_inputs"]:
            refuse(f"{len(prompts)} prompts in one request; send at most {info.context['max_inputs']}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p:
                refuse(f"prompt[{i}] must be a non-empty string")
            if not utf8_able(p):
                refuse(f"prompt[{i}] is not valid Unicode (it holds a lone surrogate escape)")
        return prompts

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_length(cls, max_tokens):
        return DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens

    @field_validator("stop", mode="before")
    @classmethod
    def _listed(cls, stop):
        return [] if stop is None else [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _text(cls, stop):
        if not all(map(utf8_able, stop)):
            raise ValueError("a stop sequence is not valid Unicode")
        return stop


def embedding_request(data: dict, service) -> tuple:
    """(inputs, encoding_format) of a /v1/embeddings body, or a 400 saying what is wrong."""
    request = EmbeddingRequest.parse(data, {"max_inputs": service.max_inputs, "dim": service.dim})
    return request.input, request.encoding_format


def completion_request(data: dict, service) -> tuple:
    """(prompts as token id lists, max_tokens, stop) of a /v1/completions body, or a 400 saying what is wrong."""
    request = CompletionRequest.parse(data, {"max_inputs": service.max_inputs})
    max_tokens = request.max_tokens
    ids = [service.tokenizer(p).input_ids for p in request.prompt]
    for i, x in enumerate(ids):
        if not x:
            raise APIError(400, f"prompt[{i}] has no tokens", "prompt")
        if len(x) > service.max_prompt_tokens or len(x) + max_tokens > service.context:
            raise APIError(400, f"prompt[{i}] is {len(x)} tokens; with max_tokens {max_tokens} it must fit the "
                                f"model's context of {service.context} tokens (prompts at most "
                                f"{service.max_prompt_tokens})", "prompt", "context_length_exceeded")
    return ids, max_tokens, request.stop


# ---- answers ----

def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ewq"}


def embedding_list(rows: list, model_id: str, fmt: str, max_length: int) -> dict:
    """/v1/embeddings' answer for the rows (vector, tokens read, truncated?) of its inputs, in order."""
    import numpy as np

    tokens = sum(n for _, n, _ in rows)
    encode = ((lambda v: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii"))
              if fmt == "base64" else (lambda v: v.tolist()))
    cut = [i for i, (_, _, t) in enumerate(rows) if t]
    out = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                                      for i, (v, _, _) in enumerate(rows)],
           "model": model_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "truncated": cut}
    if cut:
        out["note"] = truncation_note(len(cut), max_length).replace("sentence(s)", "input(s)")
    return out


def completion(results: list, prompt_tokens: int, model_id: str) -> dict:
    """/v1/completions' answer for its prompts' results (Service.complete), in order."""
    new_tokens = sum(r["tokens"] for r in results)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "choices": [{"text": r["text"], "index": i, "logprobs": None,
                                            "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                      "total_tokens": prompt_tokens + new_tokens}}
