#!/usr/bin/env python
"""Load on OpenAI-compatible embedding servers: EWQ batched, EWQ one input at a time, infinity-emb, side by side.

    python bench/serve_load.py --model minilm-l6 [--servers ewq ewq-one-at-a-time infinity] [--concurrency 1 8 64]
        [--seconds 5] [--rounds 2] [--threads 1] [--infinity-venv /tmp/svc/infvenv] [--out results.json]
    python bench/serve_load.py --url http://127.0.0.1:8000/v1 [--api-key KEY]     (a server already running)

A point is C closed-loop clients, each sending one sentence of lee_background.cor per request (POST
{base}/embeddings, encoding_format float) and the next as soon as the answer is read, for --seconds after a 1 s
warm-up; only requests sent and answered inside that window count: sentences/s, latency p50/p95/p99, errors.
Every server is started first (each on its own port, with --threads torch threads) and kept up; the rounds
alternate them (server A at 1, 8, 64 clients, then B, ...), so drift on a shared machine hits each alike; the
summary is the median over rounds. The servers:
    ewq                 python -m ewq.serve --model MODEL (requests gathered into batches of up to 32)
    ewq-one-at-a-time   the same with --max-batch 1: every input its own forward pass
    infinity            infinity-emb 0.0.78 (torch engine, batch size 32) from its own virtual environment, on the
                        float model (for a model saved by EWQ: its base model); create that environment with
                          python3.11 -m venv /tmp/svc/infvenv
                          /tmp/svc/infvenv/bin/pip install "infinity-emb[server,torch]==0.0.78" torch==2.13.0
The clients are plain asyncio (stdlib) keep-alive HTTP/1.1 connections, one per client: on a small machine the
load generator shares the cores with the server, and a client library's per-request CPU would be charged to the
server; the client's own CPU seconds per point are recorded. This is a load script, not a test: loopback only.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SCHEMA_VERSION = 1
SERVERS = ("ewq", "ewq-one-at-a-time", "infinity")
DEFAULT_INFINITY_VENV = "/tmp/svc/infvenv"
INFINITY_HOWTO = (f"python3.11 -m venv {DEFAULT_INFINITY_VENV} && {DEFAULT_INFINITY_VENV}/bin/pip install "
                  f"\"infinity-emb[server,torch]==0.0.78\" torch==2.13.0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_facts() -> dict:
    """The CPU the figures were measured on: model name, cores, the instruction-set flags kernels depend on."""
    from ewq.probes import CPU_FLAGS, cpu_info

    name, flags = cpu_info()
    return {"model_name": name or platform.processor() or "unknown", "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags], "load_average_at_start": os.getloadavg()}


def versions(venv: Path) -> dict:
    """The libraries behind each server: this environment's, and infinity-emb's own environment's."""
    import glob
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "fastapi", "uvicorn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    for dist in ("infinity_emb", "torch"):
        found = sorted(glob.glob(str(venv / "lib" / "python*" / "site-packages" / f"{dist}-*.dist-info")))
        out[f"infinity_venv_{dist}"] = Path(found[-1]).name[len(dist) + 1:-len(".dist-info")] if found else None
    return out


def sentences() -> list:
    from ewq.embed import split_sentences
    from ewq.quality import load_corpus

    return split_sentences(load_corpus().text)


# ---- the servers ----

def server_command(name: str, model_path: Path, port: int, threads: int, venv: Path) -> tuple:
    """(argv, extra environment, base URL) of one server."""
    if name == "infinity":
        env = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
               "OMP_NUM_THREADS": str(threads)}
        argv = [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(model_path), "--engine", "torch",
                "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
        return argv, env, f"http://127.0.0.1:{port}"  # infinity's routes have no /v1 unless --url-prefix /v1
    argv = [sys.executable, "-m", "ewq.serve", "--model", str(model_path), "--port", str(port), "--threads", str(threads)]
    if name == "ewq-one-at-a-time":
        argv += ["--max-batch", "1"]
    return argv, {"PYTHONPATH": str(REPO)}, f"http://127.0.0.1:{port}/v1"


def start(name, model_path, threads, venv, log_dir) -> dict:
    port = free_port()
    argv, env, base = server_command(name, model_path, port, threads, venv)
    log = Path(log_dir) / f"{name}.log"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return {"name": name, "argv": argv, "env": env, "base": base, "proc": proc, "log": str(log)}


def wait_ready(server: dict, headers: dict, timeout: float = 300) -> str:
    """The served model's id, once GET {base}/models answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server["proc"] is not None and server["proc"].poll() is not None:
            raise SystemExit(f"{server['name']} exited while starting; see {server['log']}")
        try:
            req = urllib.request.Request(server["base"] + "/models", headers=headers)
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(0.5)
    raise SystemExit(f"{server['name']} did not answer {server['base']}/models in {timeout:.0f} s; see {server['log']}")


def stop(server: dict) -> None:
    proc = server.get("proc")
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the clients ----

async def post(reader, writer, host: bytes, path: bytes, body: bytes, headers: bytes) -> tuple:
    """One request on a keep-alive connection: (status, body)."""
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
                 + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if not length:
        raise ValueError("answer without Content-Length")
    return status, await reader.readexactly(int(length.group(1)))


async def point(base: str, model: str, concurrency: int, seconds: float, texts: list, api_key: str | None,
                warmup: float = 1.0) -> dict:
    """C closed-loop clients for warmup + seconds; what was sent and answered inside the window counts."""
    from urllib.parse import urlsplit

    url = urlsplit(base)
    host, path = url.netloc.encode(), (url.path.rstrip("/") + "/embeddings").encode()
    headers = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
    begin = time.perf_counter() + warmup
    end = begin + seconds
    latencies, errors, counter = [], [0], [0]

    async def client():
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            while (t0 := time.perf_counter()) < end:
                text = texts[counter[0] % len(texts)]
                counter[0] += 1
                body = json.dumps({"model": model, "input": [text], "encoding_format": "float"}).encode()
                try:
                    status, answer = await post(reader, writer, host, path, body, headers)
                    good = status == 200 and b'"embedding"' in answer
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    good = False
                    writer.close()
                    reader, writer = await asyncio.open_connection(url.hostname, url.port)
                t1 = time.perf_counter()
                if t0 >= begin and t1 <= end:
                    if good:
                        latencies.append(t1 - t0)
                    else:
                        errors[0] += 1
        finally:
            writer.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    cpu = time.process_time() - cpu0
    ordered = sorted(latencies)

    def q(p):
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))] if ordered else None

    return {"concurrency": concurrency, "seconds": seconds, "requests_ok": len(ordered), "errors": errors[0],
            "sentences_per_s": len(ordered) / seconds, "latency_p50_s": q(0.5), "latency_p95_s": q(0.95),
            "latency_p99_s": q(0.99), "client_cpu_s": cpu}


def summarize(points: list) -> list:
    """Median over rounds per (server, concurrency)."""
    out = []
    for key in dict.fromkeys((p["server"], p["concurrency"]) for p in points):
        runs = [p for p in points if (p["server"], p["concurrency"]) == key]

        def med(field, runs=runs):
            values = [r[field] for r in runs if r[field] is not None]
            return statistics.median(values) if values else None

        out.append({"server": key[0], "concurrency": key[1], "rounds": len(runs),
                    "sentences_per_s": med("sentences_per_s"), "sentences_per_s_min": min(r["sentences_per_s"] for r in runs),
                    "sentences_per_s_max": max(r["sentences_per_s"] for r in runs), "latency_p50_s": med("latency_p50_s"),
                    "latency_p95_s": med("latency_p95_s"), "errors": sum(r["errors"] for r in runs)})
    return out


def table(summary: list) -> str:
    lines = [f"{'server':<20} {'clients':>7} {'sentences/s':>11} {'(min-max)':>13} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}"]
    for s in summary:
        def ms(v):
            return f"{1000 * v:8.1f}" if v is not None else f"{'-':>8}"

        lines.append(f"{s['server']:<20} {s['concurrency']:>7} {s['sentences_per_s']:>11.1f} "
                     f"{s['sentences_per_s_min']:>6.1f}-{s['sentences_per_s_max']:<6.1f} {ms(s['latency_p50_s'])} "
                     f"{ms(s['latency_p95_s'])} {s['errors']:>6}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the method.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6", help="what EWQ serves: 'minilm-l6' or a model directory (one saved "
                                                        "by benchmark.py --save too); default minilm-l6")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                   help="which servers to start and load (default: all three)")
    p.add_argument("--url", help="load this running endpoint instead (base URL with /v1, loopback only)")
    p.add_argument("--api-key", help="bearer key for --url")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64], help="clients per point (default 1 8 64)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point, after 1 s warm-up (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all servers, alternating them (default 2; the "
                                                         "summary is the median)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of every server (EWQ --threads, infinity OMP_NUM_THREADS; default all cores)")
    p.add_argument("--infinity-venv", default=DEFAULT_INFINITY_VENV,
                   help=f"the virtual environment holding infinity-emb (default {DEFAULT_INFINITY_VENV}); create it "
                        f"with: {INFINITY_HOWTO}")
    p.add_argument("--models-dir", default=str(REPO / "models"), help="where the embedded models live")
    p.add_argument("--out", help="JSON file to write (default /tmp/serve_load_<time>.json)")
    args = p.parse_args(argv)

    texts = sentences()
    venv = Path(args.infinity_venv)
    servers = []
    if args.url:
        if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
            raise SystemExit("--url: loopback only (this script sends sustained load)")
        servers.append({"name": "url", "base": args.url.rstrip("/"), "proc": None, "argv": None, "env": {}})
        model_path = None
    else:
        from ewq.artifact import read_metadata
        from ewq.source import resolve_model

        model_path = resolve_model(args.model, args.models_dir).path
        meta = read_metadata(model_path) or {}
        float_path = model_path
        if meta.get("is_quantized"):  # infinity cannot read EWQ's saved format: it serves the base model
            float_path = Path(meta["base_path"])
            if not float_path.is_absolute():  # recorded relative to where benchmark.py ran
                float_path = next((d / float_path for d in (Path.cwd(), REPO) if (d / float_path).is_dir()), float_path)
            float_path = float_path.resolve()
        if "infinity" in args.servers and not (venv / "bin" / "infinity_emb").is_file():
            raise SystemExit(f"infinity-emb is not in {venv}; create it with:\n  {INFINITY_HOWTO}\nor pass "
                             f"--infinity-venv DIR, or leave infinity out of --servers")
        log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{os.getpid()}"
        log_dir.mkdir(parents=True, exist_ok=True)
        for name in args.servers:
            servers.append(start(name, float_path if name == "infinity" else model_path, args.threads, venv, log_dir))
        print(f"server logs in {log_dir}", flush=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    points = []
    try:
        for s in servers:
            s["model_id"] = wait_ready(s, headers)
            print(f"{s['name']}: ready at {s['base']} (model '{s['model_id']}')", flush=True)
        for r in range(args.rounds):
            for s in servers:
                for c in args.concurrency:
                    res = asyncio.run(point(s["base"], s["model_id"], c, args.seconds, texts, args.api_key))
                    res.update(server=s["name"], round=r)
                    points.append(res)
                    p50 = f"{1000 * res['latency_p50_s']:.1f}" if res["latency_p50_s"] else "-"
                    p95 = f"{1000 * res['latency_p95_s']:.1f}" if res["latency_p95_s"] else "-"
                    print(f"round {r + 1} {s['name']:<18} {c:>3} clients: {res['sentences_per_s']:7.1f} sentences/s, "
                          f"p50 {p50} ms, p95 {p95} ms, errors {res['errors']}", flush=True)
    finally:
        for s in servers:
            stop(s)
    summary = summarize(points)
    print(table(summary))
    result = {"schema_version": SCHEMA_VERSION, "tool": "bench/serve_load.py",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_facts(),
              "versions": versions(venv),
              "settings": {"model": args.model, "model_path": str(model_path) if model_path else None,
                           "concurrency": args.concurrency, "seconds_per_point": args.seconds, "warmup_s": 1.0,
                           "rounds": args.rounds, "threads": args.threads, "request": "one sentence per request, "
                           "encoding_format float", "corpus": "lee_background.cor", "sentences": len(texts)},
              "servers": {s["name"]: {"command": s["argv"], "environment": s["env"], "base_url": s["base"],
                                      "model_id": s.get("model_id")} for s in servers},
              "points": points, "summary": summary}
    out = Path(args.out) if args.out else Path("/tmp") / f"serve_load_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
