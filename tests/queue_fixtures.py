"""Shared pieces for the job-queue tests: a real redis-server on a free loopback port in a temp directory,
a gRPC server with the Jobs service, workers as threads (GMM models) or as `diffserve worker` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from server import protogen
from server.app import start_server
from server.config import ServerConfig
from server.engine import Engine
from server.jobs_servicer import jobs_service
from server.queue.connection import connect
from server.queue.local import LocalRedis, find_redis_server
from server.queue.store import JobStore
from server.queue.worker import Worker

jpb, jgrpc = protogen.module("jobs_pb2"), protogen.module("jobs_pb2_grpc")
ROOT = Path(__file__).resolve().parent.parent
TERMINAL = (jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED)


def require_redis() -> None:
    if find_redis_server() is None:
        if os.environ.get("DIFFSERVE_REQUIRE_SERVICES"):
            pytest.fail("redis-server is not installed but DIFFSERVE_REQUIRE_SERVICES is set")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


def settings(url: str, **overrides) -> ServerConfig:
    """Test settings: a fresh key prefix (tests share one Redis), small tasks, quick reclaim."""
    base = dict(port=0, metrics_port=None, redis_url=url, queue_prefix=f"t{uuid.uuid4().hex[:8]}",
                queue_task_size=8, queue_visibility_timeout=2.0, queue_max_attempts=3)
    return replace(ServerConfig(), **{**base, **overrides})


@contextmanager
def jobs_server(models: dict, config: ServerConfig):
    store = JobStore(config.redis_url, config.queue_prefix)
    server = start_server(models, config, services=[jobs_service(store, config)])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield jgrpc.JobsStub(channel), store, f"127.0.0.1:{server.port}"
    finally:
        channel.close()
        server.stop(grace=1.0)


@contextmanager
def worker_threads(models_factory, config: ServerConfig, count: int = 1, concurrency: int = 2):
    """`count` workers in this process, each with its own engine over models_factory()."""
    with ExitStack() as stack:
        workers = []
        for k in range(count):
            engine = Engine(models_factory(), config)
            engine.warm_up()
            stack.callback(engine.close)
            worker = Worker(engine, connect(config.redis_url, fail_fast=False), config.redis_url,
                            prefix=config.queue_prefix, name=f"thread-{k}-{uuid.uuid4().hex[:4]}",
                            concurrency=concurrency, visibility_timeout=config.queue_visibility_timeout,
                            max_attempts=config.queue_max_attempts, heartbeat_interval=0.3)
            worker.start()
            stack.callback(worker.stop, 2.0)
            workers.append(worker)
        yield workers


def start_worker_process(config_path: Path, url: str, name: str, log: Path) -> subprocess.Popen:
    """`python -m server.cli worker` in a child process (one torch thread, like a small real worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "worker", "--redis", url, "--config",
                                 str(config_path), "--name", name], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(stub, job_id: str, timeout: float = 60.0):
    return wait_for(lambda: (j := stub.GetJob(jpb.GetJobRequest(id=job_id))).state in TERMINAL and j,
                    timeout, f"job {job_id} to end", every=0.1)


@contextmanager
def redis_server(directory: Path, **kwargs):
    require_redis()
    server = LocalRedis(directory, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
