"""Server settings: limits, batching, security.  Read from the `[server]` table of the models config."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from models.config import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464        # None: no /metrics endpoint
    max_samples: int = 256                 # per request
    max_steps: int = 1000
    max_queue: int = 64                    # admitted requests per model (running + waiting)
    max_batch: int = 64                    # samples per batched forward pass
    workers: int = 32                      # requests computing at once
    min_preview_every: int = 1
    max_message_bytes: int = 64 * 1024 * 1024
    grace_seconds: float = 10.0            # SIGTERM: how long in-flight requests may finish
    auth_token: str | None = None          # bearer token; health stays open
    health_models_public: bool = False     # with a token: per-model health answers without it (names leak)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None       # mTLS: require client certificates signed by this CA
    device: str = "cpu"
    torch_threads: int | None = 1          # intra-op threads; >1 thrashes when the cores are shared (docs/serving.md)
    # job queue (docs/queue.md)
    redis_url: str | None = None           # None: `serve` starts a local redis-server under run/redis
    queue_prefix: str = "diffserve"        # Redis key prefix, so several deployments can share one Redis
    queue_task_size: int = 64              # K: samples per task
    queue_max_job_samples: int = 100_000
    queue_visibility_timeout: float = 30.0  # seconds without a heartbeat before a task is reclaimed
    queue_max_attempts: int = 3            # a task failing this many times is dead-lettered, its job failed
    queue_result_ttl: float = 86_400.0     # seconds a finished job and its results are kept
    queue_worker_concurrency: int = 4      # tasks a worker runs at once (they share batched forwards)
    queue_local_worker: bool | None = None  # a worker inside `serve`; None: only with the local Redis


def load_server_config(path: str | Path, **overrides) -> ServerConfig:
    """The `[server]` table of a models config (unknown keys are errors), then CLI overrides."""
    raw = tomllib.loads(Path(path).read_text()).get("server", {})
    names = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"server.{unknown[0]}: unknown setting; known: {', '.join(sorted(names))}")
    config = ServerConfig(**raw)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
