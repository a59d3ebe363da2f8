"""Prometheus metrics (prefix diffserve_, units in names, bounded labels: model, sampler, status)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("diffserve_requests_total", "Generate requests by model, sampler and final status",
                   ["model", "sampler", "status"])
REQUEST_SECONDS = Histogram("diffserve_request_seconds", "End-to-end request latency", ["model"],
                            buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("diffserve_queue_wait_seconds", "Time from admission to the start of compute",
                          ["model"], buckets=LATENCY_BUCKETS)
COMPUTE_SECONDS = Histogram("diffserve_compute_seconds", "Sampling time of a request", ["model"],
                            buckets=LATENCY_BUCKETS)
FORWARD_SECONDS = Histogram("diffserve_forward_seconds", "Seconds per batched forward pass", ["model"],
                            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
BATCH_SIZE = Histogram("diffserve_batch_size", "Samples per batched forward pass", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
NFE = Counter("diffserve_nfe_total", "Network function evaluations spent", ["model", "sampler"])
SAMPLES = Counter("diffserve_samples_total", "Samples returned", ["model"])
INFLIGHT = Gauge("diffserve_inflight_requests", "Requests computing now", ["model"])
QUEUED = Gauge("diffserve_queued_requests", "Requests admitted and waiting for a worker", ["model"])
MODEL_READY = Gauge("diffserve_model_ready", "1 when the model is loaded and warmed up", ["model"])


def serve_metrics(port: int, addr: str = "127.0.0.1"):
    """Start the /metrics endpoint on its own port; returns (server, thread)."""
    return start_http_server(port, addr=addr)
