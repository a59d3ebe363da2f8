"""Prometheus metrics (prefix diffserve_, units in names, bounded labels: model, sampler, status)."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Up to 30 minutes: a 256x256 forward pass on CPU takes 16 s, and a request a few hundred of them.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Final statuses of a request (lower-case gRPC code names); every label set exists from start-up, so rate()
# sees the first error of each kind.
STATUSES = ("ok", "invalid_argument", "not_found", "resource_exhausted", "deadline_exceeded", "cancelled",
            "unavailable", "internal")

REQUESTS = Counter("diffserve_requests_total", "Generate requests by model, sampler and final status",
                   ["model", "sampler", "status"])
REQUEST_SECONDS = Histogram("diffserve_request_seconds", "End-to-end request latency", ["model"],
                            buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("diffserve_queue_wait_seconds", "Time from admission to the start of compute",
                          ["model"], buckets=LATENCY_BUCKETS)
COMPUTE_SECONDS = Histogram("diffserve_compute_seconds", "Sampling time of a request", ["model"],
                            buckets=LATENCY_BUCKETS)
FORWARD_SECONDS = Histogram("diffserve_forward_seconds", "Seconds per batched forward pass", ["model"],
                            buckets=FORWARD_BUCKETS)
BATCH_SIZE = Histogram("diffserve_batch_size", "Samples per batched forward pass", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
NFE = Counter("diffserve_nfe_total", "Network function evaluations spent", ["model", "sampler"])
SAMPLES = Counter("diffserve_samples_total", "Samples returned", ["model"])
INFLIGHT = Gauge("diffserve_inflight_requests", "Requests computing now", ["model"])
QUEUED = Gauge("diffserve_queued_requests", "Requests admitted and waiting for a worker", ["model"])
MODEL_READY = Gauge("diffserve_model_ready", "1 when the model is loaded and warmed up", ["model"])

# The standard gRPC server metrics (the names of go-grpc-prometheus / grpc-ecosystem), by method and code.
GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server", GRPC_LABELS)
GRPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code",
                       [*GRPC_LABELS, "grpc_code"])
GRPC_SECONDS = Histogram("grpc_server_handling_seconds", "Seconds from the start of an RPC to its status",
                         GRPC_LABELS, buckets=LATENCY_BUCKETS)


def other_sampler(sampler: str, known) -> str:
    """A bounded sampler label: the name when `known` has it, else "other" (never a client's string)."""
    return sampler if sampler in known else "other"


def create_label_sets(models: dict[str, list[str]], grpc_methods: dict[str, list[tuple[str, str]]]) -> None:
    """Create every label set at start-up (values 0), so the first error of a kind is a rate(), not a new
    series: `models` maps a model to the samplers (and search methods) it serves; `grpc_methods` maps a
    service to its (method, grpc_type) pairs."""
    for model, samplers in models.items():
        for sampler in [*samplers, "other"]:
            NFE.labels(model, sampler)
            for status in STATUSES:
                REQUESTS.labels(model, sampler, status)
        for series in (REQUEST_SECONDS, QUEUE_SECONDS, COMPUTE_SECONDS, FORWARD_SECONDS, BATCH_SIZE, SAMPLES,
                       INFLIGHT, QUEUED, MODEL_READY):
            series.labels(model)
    codes = [c.name for c in grpc.StatusCode]
    for service, methods in grpc_methods.items():
        for method, kind in methods:
            GRPC_STARTED.labels(kind, service, method)
            GRPC_SECONDS.labels(kind, service, method)
            for code in codes:
                GRPC_HANDLED.labels(kind, service, method, code)


def serve_metrics(port: int, addr: str = "127.0.0.1"):
    """Start the /metrics endpoint on its own port; returns (server, thread)."""
    return start_http_server(port, addr=addr)
