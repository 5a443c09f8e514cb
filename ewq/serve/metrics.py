"""The Prometheus metrics of one app, and the bounded route label they are counted under."""


def make_metrics():
    """A registry per app (several apps in one process, as in tests, must not share prometheus' global one)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    r = CollectorRegistry()
    short = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
    return r, {
        "requests": Counter("ewq_http_requests", "HTTP requests by route and status (499: the client went away)",
                            ["route", "status"], registry=r),
        "latency": Histogram("ewq_http_request_duration_seconds", "time from request to answer, by route", ["route"],
                             registry=r, buckets=short[2:] + (10, 30, 60)),
        "batch_size": Histogram("ewq_batch_size", "inputs per forward pass", registry=r,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        "queue_wait": Histogram("ewq_queue_wait_seconds", "time a chunk waited before its forward pass started",
                                registry=r, buckets=short),
        "forward": Histogram("ewq_forward_seconds", "forward pass time per batch (tokenizer included)", registry=r,
                             buckets=short),
        "in_flight": Gauge("ewq_inputs_in_flight", "inputs accepted and not yet answered (bounded by --max-queue)",
                           registry=r),
        "dropped": Counter("ewq_dropped_chunks", "queued chunks dropped unrun because their request was withdrawn",
                           registry=r),
        "abandoned": Counter("ewq_abandoned_requests", "requests given up before their answer", ["reason"], registry=r),
        "tokens": Counter("ewq_tokens", "tokens read (prompt) and generated (completion)", ["kind"], registry=r),
    }


def route_label(path: str) -> str:
    """A bounded label set: unknown paths (scanners) all count as `other`."""
    known = ("/v1/embeddings", "/v1/completions", "/v1/models", "/embed", "/generate", "/models/active", "/health",
             "/metrics")
    return path if path in known else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

