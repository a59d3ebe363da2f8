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
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None       # mTLS: require client certificates signed by this CA
    device: str = "cpu"


def load_server_config(path: str | Path, **overrides) -> ServerConfig:
    """The `[server]` table of a models config (unknown keys are errors), then CLI overrides."""
    raw = tomllib.loads(Path(path).read_text()).get("server", {})
    names = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"server.{unknown[0]}: unknown setting; known: {', '.join(sorted(names))}")
    config = ServerConfig(**raw)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
