"""The job queue inside `diffserve serve`: a Redis (the configured URL, or a local redis-server under
run/redis with AOF on), the Jobs service, and one worker sharing the server's engine."""

from __future__ import annotations

import logging
from pathlib import Path

from ..jobs_servicer import jobs_service
from .connection import connect, redact
from .local import HOW_TO_GET, LocalRedis, find_redis_server
from .store import JobStore
from .worker import Worker

log = logging.getLogger("diffserve.queue")


class QueueRuntime:
    def __init__(self, config, run_dir: str | Path = "run", port: int | None = None):
        self.config, self.local, self.store, self.worker = config, None, None, None
        self.why_unavailable = ""
        url = config.redis_url
        if url is None:
            if find_redis_server() is None:
                self.why_unavailable = HOW_TO_GET
                log.warning("job queue disabled: %s", HOW_TO_GET)
                return
            port = port or (6379 if _port_free(6379) else None)
            self.local = LocalRedis(Path(run_dir) / "redis", port=port).start()
            url = self.local.url
            log.info("started a local Redis for the job queue at %s (data in %s, AOF on); more workers: "
                     "diffserve worker --redis %s --config MODELS.toml", url, self.local.data_dir, url)
        self.url = url
        self.store = JobStore(url, config.queue_prefix)

    @property
    def service(self):
        return jobs_service(self.store, self.config, self.why_unavailable)

    def start_worker(self, engine) -> None:
        wanted = self.config.queue_local_worker
        if self.store is None or wanted is False or (wanted is None and self.local is None):
            return
        client = connect(self.url, fail_fast=False, name="diffserve-worker")
        c = self.config
        self.worker = Worker(engine, client, self.url, prefix=c.queue_prefix, concurrency=c.queue_worker_concurrency,
                             visibility_timeout=c.queue_visibility_timeout, max_attempts=c.queue_max_attempts)
        self.worker.start()
        log.info("a worker runs inside the server on %s", redact(self.url))

    def stop_worker(self, grace: float) -> None:
        if self.worker is not None:
            self.worker.stop(grace)

    def close(self) -> None:
        if self.local is not None:
            self.local.stop()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
