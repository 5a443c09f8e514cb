"""The HTTP service (python -m ewq.serve) against live uvicorn servers: EWQ's endpoints, the OpenAI-compatible ones
through the official openai client, batching (a vector does not depend on its batch-mates), limits, hostile
requests, abandoned requests, timeouts, the API key, metrics and graceful shutdown."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import REPO

from ewq.common import run_cli

FP32_TOLERANCE = dict(cosine=0.99999, max_abs=1e-5)  # float rounding only: what batching may change
SENTENCES = ["The fire moved east towards the town.", "Rain fell on Sydney overnight.", "A short one.",
             "Residents fled as the blaze approached the houses on the ridge.", "The bank raised rates.",
             "Police said the man was arrested on Friday.", "Stocks fell.", "He left the team after three seasons."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, raw: bytes | None = None, headers=None, method=None):
    """(status, parsed JSON body, headers); never raises for an HTTP error status."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def metric(url, name, headers=None) -> float:
    """The sum of a Prometheus series over its labels (0 when absent)."""
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers or {}), timeout=30) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


class Server:
    def __init__(self, model, flags, cwd):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # one torch thread: on a machine shared with other work, two threads waiting for each other's core made
        # a 16-token tiny generation take 8 s instead of 0.05 s
        self.proc = subprocess.Popen([sys.executable, "-m", "ewq.serve", "--model", str(model), "--port", str(self.port),
                                      "--threads", "1", *map(str, flags)], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(480):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None:
                    raise AssertionError(self.proc.stdout.read())
                time.sleep(0.25)
        raise AssertionError("the server did not start in 120 s")

    def stop(self) -> str:
        """Stops the server; returns what it printed."""
        if self.proc.stdout.closed:  # stopped before
            return self.output
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output = out
        return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = []

    def start(model, *flags):
        server = Server(model, flags, tmp_path_factory.mktemp("serve"))
        started.append(server)
        return server

    yield start
    for server in started:  # all at once: each takes a moment to shut down
        server.proc.terminate()
    for server in started:
        out = server.stop()
        assert "Traceback" not in out, out  # nothing a client sent made the server print a traceback


def save_quantized_tiny(model_dir, backend: str, root):
    """A quantized copy of a tiny encoder, saved as benchmark.py --save saves it (in-process: seconds, not a run)."""
    from ewq.analysis import fingerprint
    from ewq.apply import apply_plan, load_model
    from ewq.artifact import save_quantized
    from ewq.backends import QuantSettings
    from ewq.checkpoint import open_checkpoint
    from ewq.plan import builtin_plan
    from ewq.source import ModelSource, load_tokenizer

    ckpt = open_checkpoint(model_dir)
    source = ModelSource(model_dir.name, model_dir)
    fp = fingerprint(ckpt, progress=False)
    plan = builtin_plan("uniform-8bit", source, ckpt, fp, raw_bits=32)
    model = load_model(model_dir, torch.float32, "encoder")
    settings = QuantSettings(backend=backend)
    apply_plan(model, plan, settings, torch.float32, progress=False)
    return save_quantized(model, plan, source, fp, load_tokenizer(model_dir), settings, torch.float32, root)[0]


@pytest.fixture(scope="module")
def encoder_server(tiny_encoder, servers):
    """A float tiny encoder with a 64-token limit, batching with a long wait so concurrent requests meet."""
    return servers(tiny_encoder("bert"), "--max-wait-ms", 300, "--model-name", "tiny-embed")


def client(url, key="unused"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- EWQ's own endpoints (as before the OpenAI ones) ----

def test_service_answers_models_active_and_embeds(tiny_encoder, tmp_path, servers):
    saved = save_quantized_tiny(tiny_encoder("xlm-roberta"), "torch-dynamic", tmp_path / "qm")
    server = servers(saved)
    url = server.url

    status, info, _ = call(url + "/models/active")
    assert status == 200
    meta = json.loads((saved / "metadata.json").read_text())
    assert info["kind"] == "encoder" and info["is_quantized"] is True and info["metadata"] == "present"
    assert info["method"] == "dynamic-ptq-int8" and info["precision_counts"] == {"raw": 0, "8-bit": 3, "4-bit": 0}
    assert info["fingerprint"] == meta["base_fingerprint"] and info["avg_bits_per_weight"] == meta["avg_bits_per_weight"]
    assert info["batching"]["cross_request"] is False and "per tensor" in info["batching"]["why"]

    status, out, _ = call(url + "/embed", {"sentences": ["The fire moved east.", "Rain fell on Sydney."]})
    assert status == 200 and out["dim"] == 64 and len(out["embeddings"]) == 2 and out["truncated"] == []
    assert sum(x * x for x in out["embeddings"][0]) == pytest.approx(1.0, abs=1e-4)  # its Normalize step
    status, out, _ = call(url + "/embed", {"sentences": ["word " * 200, "short one"]})
    assert status == 200 and out["truncated"] == [0] and "first 64 tokens" in out["note"]

    for body, raw, words in [({"sentences": []}, None, "non-empty"), ({"sentences": [3]}, None, "not a string"),
                             ({"text": "x"}, None, "sentences"), (None, b"\xff\xfe{", "not UTF-8"),
                             (None, b"{not json", "not valid JSON"), ({"prompt": "hi"}, None, None),
                             ({"sentences": ["x"] * 257}, None, "at most 256"),
                             ({"sentences": ["\ud800"]}, None, "lone surrogate")]:
        path = "/generate" if body == {"prompt": "hi"} else "/embed"
        status, out, _ = call(url + path, body, raw)
        assert 400 <= status < 500 and isinstance(out["error"], str), (body, raw, out)
        assert words is None or words in out["error"], (body, raw, out)
    status, out, _ = call(url + "/nowhere")
    assert status == 404 and "error" in out
    status, info, _ = call(url + "/models/active")  # still serving after every bad request
    assert status == 200

    # a per-tensor int8 model is not cross-batched: a sentence's vector is the same, bit for bit, alone and while
    # other requests crowd the server; the direct (no HTTP) path gives the same bits too
    from ewq.serve import Service

    alone = call(url + "/v1/embeddings", {"model": saved.name, "input": SENTENCES[0], "encoding_format": "float"})[1]
    passes = metric(url, "ewq_batch_size_count")
    crowd = busy(url, saved.name, SENTENCES[0])
    assert metric(url, "ewq_batch_size_count") - passes == 13  # one forward pass per request
    assert crowd == alone["data"][0]["embedding"]
    direct = Service(str(saved)).embed([SENTENCES[0]])["embeddings"][0]
    assert direct == alone["data"][0]["embedding"]
    # ...and cross-batching it would have changed the vector: the scale is the batch's
    service = Service(str(saved))
    shared = service.embed_rows([SENTENCES[0], "word " * 60])[0][0]
    assert not np.array_equal(shared, np.asarray(direct, np.float32))
    assert "batching: each request on its own (torch dynamic int8" in server.stop()  # said at start-up


def busy(url, model, sentence, others=12) -> list:
    """`sentence`'s float vector, asked for while `others` other requests (of 1-3 sentences) are in flight."""
    def ask(i):
        inp = sentence if i == others // 2 else SENTENCES[i % len(SENTENCES):][:1 + i % 3] or SENTENCES[:2]
        return i, call(url + "/v1/embeddings", {"model": model, "input": inp, "encoding_format": "float"})

    with ThreadPoolExecutor(others + 1) as pool:
        results = dict(pool.map(ask, range(others + 1)))
    assert all(status == 200 for status, _, _ in results.values()), results
    return results[others // 2][1]["data"][0]["embedding"]


@pytest.mark.parametrize("variant", ["fp32", "torchao-weight-only"])
def test_a_vector_does_not_depend_on_its_batch(variant, tiny_encoder, tmp_path, servers):
    """Float and weight-only int8 models are cross-batched; a sentence's vector alone and inside a busy batch of
    other requests agrees within float rounding (FP32_TOLERANCE)."""
    model = tiny_encoder("bert")
    if variant != "fp32":
        model = save_quantized_tiny(model, "torchao", tmp_path / "qm")
    server = servers(model, "--max-wait-ms", 300)
    info = call(server.url + "/models/active")[1]
    assert info["batching"]["cross_request"] is True and info["batching"]["max_batch"] == 32
    alone = call(server.url + "/v1/embeddings", {"model": model.name, "input": SENTENCES[0],
                                                 "encoding_format": "float"})[1]["data"][0]["embedding"]
    passes_before = metric(server.url, "ewq_batch_size_count")
    crowd = busy(server.url, model.name, SENTENCES[0])
    passes = metric(server.url, "ewq_batch_size_count") - passes_before
    assert passes < 13, passes  # the 13 requests shared forward passes
    assert cosine(alone, crowd) >= FP32_TOLERANCE["cosine"]
    assert np.abs(np.subtract(alone, crowd)).max() <= FP32_TOLERANCE["max_abs"]


# ---- the OpenAI-compatible endpoints, through the official client ----

def test_openai_client_embeddings_match_embed(encoder_server, tiny_encoder):
    from transformers import AutoTokenizer

    url, c = encoder_server.url, client(encoder_server.url)
    assert [m.id for m in c.models.list()] == ["tiny-embed"] and c.models.retrieve("tiny-embed").owned_by == "ewq"
    texts = SENTENCES[:3]
    reference = np.array(call(url + "/embed", {"sentences": texts})[1]["embeddings"])

    r = c.embeddings.create(model="tiny-embed", input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "tiny-embed" and r.object == "list"
    assert np.allclose([d.embedding for d in r.data], reference, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder("bert"))
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens  # real counts, special tokens included
    assert r.truncated == []  # EWQ's extra field comes through the client's model

    r = c.embeddings.create(model="tiny-embed", input=texts[1])  # the client asks base64 and decodes it itself
    assert len(r.data) == 1 and np.allclose(r.data[0].embedding, reference[1], atol=1e-6)
    r = c.embeddings.create(model="tiny-embed", input=texts[1], encoding_format="base64")  # asked: not decoded
    assert np.allclose(np.frombuffer(base64.b64decode(r.data[0].embedding), "<f4"), reference[1], atol=1e-6)
    r = c.embeddings.create(model="tiny-embed", input=texts[1], dimensions=64)  # the model's own size is fine

    r = c.embeddings.create(model="tiny-embed", input=["word " * 200, "short"], encoding_format="float")
    assert r.truncated == [0] and "first 66 tokens" in r.note  # the tiny BERT's 66 positions
    assert r.usage.prompt_tokens == 66 + len(tokenizer("short")["input_ids"])

    import openai

    for kwargs, status, words in [(dict(input=[[101, 7592, 102]]), 400, "check_embedding_ctx_length=False"),
                                  (dict(input=[101, 7592]), 400, "tiktoken"),
                                  (dict(input="x", dimensions=32), 400, "64-dimensional"),
                                  (dict(input="x", model="gpt-nope"), 404, "does not exist"),
                                  (dict(input=""), 400, "empty"), (dict(input=[]), 400, "non-empty"),
                                  (dict(input=["x"] * 257), 400, "at most 256")]:
        with pytest.raises(openai.APIStatusError) as e:
            c.embeddings.create(**{"model": "tiny-embed", "encoding_format": "float", **kwargs})
        assert e.value.status_code == status and words in e.value.message, (kwargs, e.value.message)
        assert e.value.body["type"] == "invalid_request_error" and "param" in e.value.body
    with pytest.raises(openai.BadRequestError, match="encoder"):
        c.completions.create(model="tiny-embed", prompt="Hello")


def test_openai_client_completions(tiny_factory, servers):
    import openai

    model = tiny_factory("llama")
    server = servers(model)
    c = client(server.url)
    full = call(server.url + "/generate", {"prompt": "Hello there", "max_new_tokens": 12})[1]["text"]

    r = c.completions.create(model=model.name, prompt="Hello there", max_tokens=12)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and choice.index == 0
    assert choice.finish_reason in ("length", "stop") and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens and r.usage.prompt_tokens > 0
    if choice.finish_reason == "length":  # no end-of-sequence token: the same greedy tokens as /generate
        assert r.usage.completion_tokens == 12 and choice.text == full

    r = c.completions.create(model=model.name, prompt="Hello there")  # OpenAI's default max_tokens
    assert r.usage.completion_tokens <= 16
    text = r.choices[0].text
    stop = next((ch for ch in text[1:] if ch.isascii() and ch.isprintable()), None)
    if stop:  # a stop sequence ends the text before it, finish_reason "stop"
        r = c.completions.create(model=model.name, prompt="Hello there", stop=[stop])
        assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens <= 16

    r = c.completions.create(model=model.name, prompt=["Hello there", "Once upon"], max_tokens=3)
    assert [ch.index for ch in r.choices] == [0, 1] and r.usage.completion_tokens <= 6

    for kwargs, words in [(dict(stream=True), "stream"), (dict(max_tokens=0), "max_tokens"),
                          (dict(max_tokens=10 ** 9), "max_tokens"), (dict(n=2), "n=2"),
                          (dict(prompt=[1, 2, 3]), "token ids"), (dict(prompt=""), "non-empty"),
                          (dict(stop=["a"] * 5), "stop"), (dict(max_tokens=250), "context")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": model.name, "prompt": "Hello there " * 3, **kwargs})
        assert words in e.value.message, (kwargs, e.value.message)
    with pytest.raises(openai.BadRequestError, match="decoder"):
        c.embeddings.create(model=model.name, input="x")


# ---- limits, hostile requests, abandoned requests ----

def test_hostile_requests_get_4xx_never_5xx(encoder_server):
    url = encoder_server.url
    ok = {"model": "tiny-embed", "input": "x", "encoding_format": "float"}
    cases = [
        b"", b"null", b"[]", b'"x"', b"{not json", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"{" * 100000,
        b"[" * 500000 + b"]" * 500000, json.dumps({"model": "tiny-embed", "input": "x" * 5000000}).encode(),
        b'{"model": "tiny-embed", "input": "x", "dimensions": 1e999}', b'{"model": "tiny-embed", "input": NaN}',
        b'{"model": "tiny-embed", "input": "x", "dimensions": ' + b"9" * 5000 + b"}",
        b'{"model": "tiny-embed", "input": "x\\u0000y\\u0000", "encoding_format": "float"}',
        b'{"model": "tiny-embed", "input": "\\ud800"}', b'{"model": "tiny-embed", "input": "a\x00b"}',
    ]
    bodies = [{**ok, "input": v} for v in (None, 3, 3.5, True, {"a": 1}, [None], [["x"]], ["x", 1], [""], " ")] + \
             [{**ok, "encoding_format": v} for v in ("hex", 1, ["float"])] + \
             [{**ok, "dimensions": v} for v in (True, -1, 64.5, "64", 10 ** 30)] + \
             [{**ok, "model": v} for v in (None, 1, "", "x" * 10000, ["tiny-embed"])] + \
             [{"sentences": v} for v in ("abc", [[]], [None], {"a": "b"})]
    for raw in cases + [json.dumps(b).encode() for b in bodies]:
        for path in ("/v1/embeddings", "/embed", "/v1/completions", "/generate"):
            status, out, _ = call(url + path, raw=raw)
            assert status < 500 and "error" in out or status == 200, (path, raw[:80], status, out)
            if path in ("/embed", "/generate"):
                assert status == 200 or isinstance(out["error"], str)
            elif status != 200:
                assert set(out["error"]) == {"message", "type", "param", "code"}, out
    for path, method in [("/v1/embeddings", "GET"), ("/embed", "GET"), ("/health", "POST"), ("/v1/models/nope", "GET"),
                         ("/v1/nope", "POST"), ("/%ff%00", "GET")]:
        status, out, _ = call(url + path, method=method, raw=b"{}" if method == "POST" else None)
        assert 400 <= status < 500 and "error" in out, (path, method, status, out)
    assert call(url + "/health")[0] == 200
    assert metric(url, 'ewq_http_requests_total{route="/v1/embeddings",status="500"}') == 0


def test_body_limits_and_abandoned_requests(tiny_encoder, servers):
    # a fresh server waits --max-wait-ms for company (1.5 s: longer than --timeout); one batch of up to 256 inputs
    server = servers(tiny_encoder("bert"), "--model-name", "bert", "--max-body-bytes", 4096, "--max-wait-ms", 1500,
                     "--timeout", 0.5, "--max-queue", 300, "--max-batch", 256)
    url = server.url
    big = json.dumps({"model": "bert", "input": "x" * 5000}).encode()
    status, out, headers = call(url + "/v1/embeddings", raw=big)  # Content-Length over the limit: not even read
    assert status == 413 and out["error"]["code"] == "request_too_large" and headers["connection"] == "close"
    status, out, _ = call(url + "/embed", raw=big)
    assert status == 413 and "4096 bytes" in out["error"]

    def chunked(path):  # no Content-Length: the body is counted as it arrives
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Transfer-Encoding: chunked\r\n\r\n".encode())
            for _ in range(8):
                s.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
            s.sendall(b"0\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    status, out = chunked("/v1/embeddings")
    assert status == 413 and out["error"]["code"] == "request_too_large"

    # timeout: the request waits 1.5 s for company, gives up at 0.5 s: 503, not retried, and its work never runs
    passes = metric(url, "ewq_batch_size_count")
    status, out, headers = call(url + "/v1/embeddings", {"model": "bert", "input": "x"})
    assert status == 503 and out["error"]["code"] == "timeout" and headers["x-should-retry"] == "false"
    # a client that goes away: its queued work is dropped too
    body = json.dumps({"model": "bert", "input": ["y"] * 10}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.2)
    time.sleep(2.5)
    assert metric(url, "ewq_batch_size_count") == passes  # nothing of either ran
    assert metric(url, 'ewq_abandoned_requests_total{reason="timeout"}') == 1
    assert metric(url, 'ewq_abandoned_requests_total{reason="disconnect"}') == 1
    assert metric(url, "ewq_dropped_chunks_total") >= 2

    # overload: more inputs waiting than --max-queue: 429 with Retry-After
    def ask(n):
        return call(url + "/v1/embeddings", {"model": "bert", "input": ["z"] * n})

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, 200)
        time.sleep(0.2)
        status, out, headers = ask(200)
    assert status == 429 and headers["retry-after"] == "1" and out["error"]["code"] == "rate_limit_exceeded"
    assert first.result()[0] == 503  # (it timed out waiting for company)
    assert call(url + "/health")[0] == 200


def test_api_key_metrics_and_keep_alive(tiny_encoder, servers):
    import http.client

    import openai

    server = servers(tiny_encoder("bert"), "--api-key", "s3cret", "--model-name", "bert")
    url = server.url
    assert call(url + "/health")[0] == 200  # the probe needs no key
    for path in ("/v1/models", "/models/active", "/metrics", "/nowhere"):
        status, out, headers = call(url + path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", path
    status, out, _ = call(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    status, out, _ = call(url + "/embed", {"sentences": ["x"]})
    assert status == 401 and isinstance(out["error"], str)  # EWQ's endpoints keep their error shape
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    good = client(url, "s3cret")
    assert good.embeddings.create(model="bert", input="hello world").data[0].embedding
    auth = {"Authorization": "Bearer s3cret"}
    assert call(url + "/embed", {"sentences": ["x"]}, headers=auth)[0] == 200
    assert metric(url, 'ewq_http_requests_total{route="/v1/models",status="401"}', auth) == 3  # no key, wrong key, the client with a wrong key
    assert metric(url, 'ewq_http_requests_total{route="/v1/embeddings",status="200"}', auth) == 1
    assert metric(url, "ewq_batch_size_count", auth) >= 1 and metric(url, "ewq_queue_wait_seconds_count", auth) >= 1

    # keep-alive answers do not stall on delayed ACK (the listening socket says IPPROTO_TCP: TCP_NODELAY is set)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        conn.request("GET", "/v1/models", headers=auth)
        conn.getresponse().read()
        times.append(time.perf_counter() - t0)
    conn.close()
    assert sorted(times)[len(times) // 2] < 0.02, times  # 44 ms each without TCP_NODELAY, 0.4 ms with


def test_listening_socket_is_tcp_for_nodelay():
    from ewq.serve import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_sigterm_lets_requests_in_flight_finish(tiny_encoder, tmp_path):
    """In flight at SIGTERM: answered (200, Connection: close); afterwards: refused; the process exits 0."""
    server = Server(tiny_encoder("bert"), ["--max-wait-ms", 1500, "--model-name", "bert"], tmp_path)
    try:
        results = []

        def ask():
            results.append(call(server.url + "/v1/embeddings", {"model": "bert", "input": "in flight"}))

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.5)  # the request is waiting for company in the batcher
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(server.url + "/health", timeout=5)  # new connections are refused
        asker.join(30)
        status, out, headers = results[0]
        assert status == 200 and len(out["data"]) == 1 and headers["connection"] == "close"
        assert server.proc.wait(30) == 0
    finally:
        out = server.stop()
    assert "Traceback" not in out, out


# ---- without a server ----

def test_service_refuses_a_busy_port_before_loading_the_model(tmp_path, capsys):
    from ewq import serve

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # the model does not exist: had the port been checked after loading, the message would be about the model
        assert run_cli(serve.main, ["--model", str(tmp_path / "absent"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_models_active_never_guesses(tiny_encoder, tiny_factory, tmp_path):
    from ewq.serve import Service

    service = Service(str(tiny_encoder("bert")))  # a plain checkpoint without metadata.json
    assert service.info["is_quantized"] is None and service.info["metadata"] == "missing"
    decoder = Service(str(tiny_factory("llama")))
    out = decoder.generate("Hello", 4)
    assert out["new_tokens"] == 4 and isinstance(out["text"], str)
    with pytest.raises(Exception, match="decoder; it has no sentence embeddings"):
        decoder.embed(["x"])


def test_batching_policy_follows_the_metadata(tiny_encoder):
    from ewq.serve import ServeSettings, Service, batching_policy, create_app

    counts = {"raw": 0, "8-bit": 3, "4-bit": 0}
    assert batching_policy(None, "encoder")["cross_request"] is True
    assert batching_policy({"is_quantized": False}, "encoder")["cross_request"] is True
    assert batching_policy({"is_quantized": True, "method": "dynamic-ptq-int8", "counts": counts}, "encoder")["cross_request"] is False
    assert batching_policy({"is_quantized": True, "method": "ewq-bitsandbytes", "counts": counts}, "encoder")["cross_request"] is False
    nf4 = {"is_quantized": True, "method": "ewq-bitsandbytes", "counts": {"raw": 1, "8-bit": 0, "4-bit": 2},
           "matrix_counts": {"raw": 6, "8-bit": 0, "4-bit": 12}}
    assert batching_policy(nf4, "encoder")["cross_request"] is True  # 4-bit weight-only: activations stay float
    assert batching_policy({"is_quantized": True, "method": "ewq-torchao", "counts": counts}, "encoder")["cross_request"] is True
    per_token = batching_policy({"is_quantized": True, "method": "ewq-torchao", "counts": counts,
                                 "int8_activations": True}, "encoder")
    assert per_token["cross_request"] is True and "1.6e-2" in per_token["tolerance"]
    assert batching_policy(None, "decoder")["cross_request"] is False
    service = Service(str(tiny_encoder("bert")))
    assert create_app(service).info["batching"]["cross_request"] is True
    forced = create_app(service, ServeSettings(cross_batch="off")).info["batching"]
    assert forced["cross_request"] is False and forced["why"].startswith("--cross-batch off")


def test_flags_are_checked_before_anything_loads(tmp_path, capsys):
    from ewq import serve

    for flags, words in [(["--max-batch", "0"], "--max-batch must be at least 1"),
                         (["--max-queue", "10"], "--max-queue (10) must be at least --max-inputs"),
                         (["--timeout", "nan"], "--timeout must be a finite number"),
                         (["--threads", "0"], "--threads must be at least 1")]:
        assert run_cli(serve.main, ["--model", str(tmp_path / "absent"), "--port", "1", *flags]) == 2
        assert words in capsys.readouterr().err


def test_length_groups_is_the_cheapest_split():
    import itertools
    import random

    from ewq.serve import length_groups

    def cost(groups, lengths, pass_cost):
        return sum(pass_cost + len(g) * max(lengths[i] for i in g) for g in groups)

    assert length_groups([12] * 8) == [list(range(8))]  # equal lengths: one pass
    assert sorted(map(sorted, length_groups([5, 200, 6], 16))) == [[0, 2], [1]]  # no padding 5 to 200
    random.seed(0)
    for _ in range(200):
        lengths = [random.randint(3, 60) for _ in range(random.randint(1, 8))]
        pass_cost = random.choice([0, 16, 100])
        groups = length_groups(lengths, pass_cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, pass_cost)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(groups, lengths, pass_cost) == best


def test_batcher_gathers_splits_interleaves_and_drops():
    """The collector on its own, with a model that records its batches: requests share a pass (cross_request) or
    not, a large request goes in chunks that let another request through between them, a withdrawn request's
    queued chunk never runs."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ewq.serve import Batcher, make_metrics

    async def scenario(cross: bool):
        passes = []

        def run(inputs):
            time.sleep(0.05)
            passes.append(list(inputs))
            return [x.upper() for x in inputs]

        with ThreadPoolExecutor(1) as worker:
            b = Batcher(run, worker, max_batch=4, max_wait_s=0.1, max_queue=100, cross_request=cross,
                        metrics=make_metrics()[1])
            b.start()
            small = await asyncio.gather(*(b.submit([f"r{i}"]) for i in range(3)))
            assert small == [["R0"], ["R1"], ["R2"]]
            big = asyncio.ensure_future(b.submit([f"b{i}" * (1 + i % 3) for i in range(9)]))
            await asyncio.sleep(0.01)
            other = asyncio.ensure_future(b.submit(["o"]))
            gone = asyncio.ensure_future(b.submit(["g"]))
            await asyncio.sleep(0.01)
            gone.cancel()
            assert await big == [f"B{i}" * (1 + i % 3) for i in range(9)] and await other == ["O"]
            await b.close()
        return passes

    shared = asyncio.run(scenario(True))
    assert shared[0] == ["r0", "r1", "r2"]  # gathered into one pass
    assert not any("g" in p for p in shared)  # withdrawn before its turn: never ran
    assert shared.index(next(p for p in shared if "o" in p)) < len(shared) - 1  # "o" did not wait for all of big
    assert all(len(p) <= 4 for p in shared)
    alone = asyncio.run(scenario(False))
    assert alone[:3] == [["r0"], ["r1"], ["r2"]] and ["o"] in alone  # each request its own pass
    assert not any("g" in p for p in alone)
