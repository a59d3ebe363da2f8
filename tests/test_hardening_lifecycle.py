"""Issue 16 items 2-4: SIGTERM drains at once, one server per port, one owner per local Redis data
directory, a local Redis URL that stays the same across restarts.  Real processes, real Redis."""

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import start_server
from server.config import ServerConfig
from server.errors import CannotStart
from server.queue.runtime import QueueRuntime
from tests.queue_fixtures import jgrpc, jpb, require_redis, wait_for
from tests.server_fixtures import gmm_model, pb, pb_grpc, running_server, unet_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
CONFIG = """
model_roots = ["."]

[server]
queue_task_size = 8
queue_worker_concurrency = 1
grace_seconds = 4.0

[[models]]
name = "unet"
directory = "unet"
kind = "diffusion"
default_sampler = "dpmpp_2m"
default_steps = 4
null_class = 10
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
            "--metrics-port", "0"]


def test_a_second_server_on_a_used_port_fails_naming_the_port():
    """gRPC's default SO_REUSEPORT let two servers bind one port and split the requests between them."""
    port = free_port()
    with running_server({"gmm": gmm_model()}, port=port):
        config = replace(ServerConfig(), port=port, metrics_port=None)
        with pytest.raises(CannotStart, match=f"port {port} "):
            start_server({"gmm": gmm_model()}, config, warm_up=False)


def test_serve_on_a_used_port_fails_at_once_with_one_line(tmp_path):
    """The port is checked before any model loads: this config's model does not even exist."""
    (tmp_path / "models.toml").write_text(CONFIG)  # no unet/ directory: loading it would fail differently
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(serve_command(tmp_path / "models.toml", port), cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()  # not even the local Redis was started


def _hold_6379():
    """Take 6379 if it is free, so the local Redis cannot fall back on it and must pick (and keep) another."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 6379))
        s.listen()
    except OSError:
        pass
    return s


def test_the_local_redis_directory_has_one_owner_and_a_stable_url(tmp_path):
    require_redis()
    config = ServerConfig(port=0, metrics_port=None, redis_url=None)
    with _hold_6379():
        first = QueueRuntime(config, run_dir=tmp_path)
        try:
            with pytest.raises(CannotStart, match="belongs to another running server") as info:
                second = QueueRuntime(config, run_dir=tmp_path)
                second.close()
            assert str(tmp_path / "redis") in str(info.value) and str(os.getpid()) in str(info.value)
            url = first.url
        finally:
            first.close()
        again = QueueRuntime(config, run_dir=tmp_path)  # the owner left: the directory is free again
        try:
            assert again.url == url  # the "more workers" URL printed last time still works
        finally:
            again.close()


def test_sigterm_stops_admission_at_once_while_the_worker_is_busy(tmp_path):
    require_redis()
    unet_model(tmp_path)  # tmp/unet: a small UNet saved with diffusers (safetensors)
    (tmp_path / "models.toml").write_text(CONFIG)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(serve_command(tmp_path / "models.toml", port), cwd=tmp_path, env=ENV, stdout=log,
                            stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        def serving():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_for(serving, 180, "the server to load and warm up", every=0.5)
        jobs = jgrpc.JobsStub(channel)
        job = jobs.SubmitJob(jpb.SubmitJobRequest(request=pb.GenerateRequest(
            model="unet", sampler="euler", steps=1000, num_samples=64)))
        wait_for(lambda: jobs.GetJob(jpb.GetJobRequest(id=job.id)).state == jpb.JOB_STATE_RUNNING, 60,
                 "the built-in worker to start the job")
        proc.terminate()
        stopped_at = time.monotonic()

        def not_serving():
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.RpcError:
                return True  # already gone
        wait_for(not_serving, 10, "health NOT_SERVING")
        assert time.monotonic() - stopped_at < 1.5  # at once, not after the worker's grace period
        stub = pb_grpc.DiffserveStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(model="unet", steps=1), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(60) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
