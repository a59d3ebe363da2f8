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
        self._lock = None
        self.why_unavailable = ""
        url = config.redis_url
        if url is None:
            if find_redis_server() is None:
                self.why_unavailable = HOW_TO_GET
                log.warning("job queue disabled: %s", HOW_TO_GET)
                return
            data_dir = Path(run_dir) / "redis"
            self._lock = lock_data_dir(data_dir)  # one owner: two Redis on one AOF directory corrupt each other
            try:
                self.local = LocalRedis(data_dir, port=port or stable_port(data_dir)).start()
            except BaseException:
                self._lock.close()
                raise
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
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None


def lock_data_dir(data_dir: Path):
    """An exclusive lock on `data_dir` for as long as the returned file stays open (held by this process)."""
    import fcntl
    import os

    from ..errors import CannotStart

    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "owner.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise CannotStart(f"the local Redis data directory {data_dir} belongs to another running server (pid "
                          f"{owner}); stop it (`make stop`), or give this server --redis URL") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def stable_port(data_dir: Path) -> int:
    """The local Redis port: the one used last time (kept in data_dir/port, so the worker URL the server
    prints stays valid across restarts), else 6379 when free, else any free port."""
    from .local import free_port

    saved = data_dir / "port"
    try:
        port = int(saved.read_text())
    except (OSError, ValueError):
        port = 0
    if not port or not _port_free(port):
        if port:
            log.warning("the local Redis port %d of the last run is taken; picking another", port)
        port = 6379 if _port_free(6379) else free_port()
    saved.write_text(f"{port}\n")
    return port


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT own nothing
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
