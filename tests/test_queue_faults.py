"""Faults with real processes: two `diffserve worker` processes (a small UNet saved with diffusers, loaded
from a models config) over a real redis-server; a worker SIGKILLed in the middle of a task; Redis SIGKILLed
and restarted on its data directory (AOF, appendfsync always).  The tests run in this order."""

import os
import signal
import subprocess
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from server.app import load_models
from server.client import tensor_to_array
from server.config import load_server_config
from server.generation import GenerateRequest, generate
from server.queue.keys import GROUP
from server.queue.local import LocalRedis
from tests.queue_fixtures import jobs_server, jpb, require_redis, start_worker_process, wait_done, wait_for
from tests.server_fixtures import pb, unet_model

CONFIG = """
model_roots = ["."]

[server]
queue_prefix = "faults"
queue_task_size = 25
queue_visibility_timeout = 2.0
queue_worker_concurrency = 2

[[models]]
name = "unet"
directory = "unet"
kind = "diffusion"
default_sampler = "dpmpp_2m"
default_steps = 4
null_class = 10
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_redis()
    tmp = tmp_path_factory.mktemp("faults")
    unet_model(tmp)  # a small random UNet written with save_pretrained (safetensors) into tmp/unet
    (tmp / "models.toml").write_text(CONFIG)
    redis_server = LocalRedis(tmp / "redis", appendfsync="always").start()
    config = load_server_config(tmp / "models.toml", port=0, metrics_port=None, redis_url=redis_server.url)
    procs = {name: start_worker_process(tmp / "models.toml", redis_server.url, name, tmp / f"{name}.log")
             for name in ("w1", "w2")}
    try:
        models = load_models(tmp / "models.toml")
        with jobs_server(models, config) as (stub, store, _):
            def alive():
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        raise AssertionError(f"worker {name} exited: {(tmp / f'{name}.log').read_text()[-2000:]}")
                return store.stats()["workers"] == 2

            wait_for(alive, 180, "two worker processes to load the model and heartbeat", every=0.5)
            yield SimpleNamespace(stub=stub, store=store, redis=redis_server, procs=procs, model=models["unet"])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis_server.stop()


def task_results(store, job_id: str) -> dict[int, object]:
    raw = store.redis.hgetall(store.keys.job(job_id, "results"))
    return {int(k): jpb.TaskResult.FromString(v) for k, v in raw.items()}


def all_samples(stub, job_id: str) -> list:
    samples, token = [], ""
    while True:
        page = stub.GetJobResults(jpb.GetJobResultsRequest(id=job_id, page_size=128, page_token=token))
        samples += page.samples
        token = page.next_page_token
        if not token:
            return samples


def test_500_samples_over_two_worker_processes_equal_direct_generation(cluster):
    request = dict(model="unet", sampler="dpmpp_2m", steps=2, num_samples=500, base_seed=1000, class_label=3,
                   guidance=1.0, format=pb.TENSOR)
    job = cluster.stub.SubmitJob(jpb.SubmitJobRequest(request=pb.GenerateRequest(**request)))
    assert job.tasks_total == 20
    done = wait_done(cluster.stub, job.id, timeout=180)
    assert done.state == jpb.JOB_STATE_SUCCEEDED and done.samples_done == 500 and done.tasks_done == 20
    results = task_results(cluster.store, job.id)
    assert sorted(results) == list(range(20)) and {r.worker for r in results.values()} == {"w1", "w2"}
    samples = all_samples(cluster.stub, job.id)
    assert [s.seed for s in samples] == list(range(1000, 1500))
    direct = generate(cluster.model, GenerateRequest("dpmpp_2m", 2, n=500, seed=1000, class_label=3, guidance=1.0))
    queued = np.stack([tensor_to_array(s.tensor) for s in samples])
    assert np.abs(queued - direct.samples.float().numpy()).max() < 1e-5


def test_worker_killed_mid_task_is_reclaimed_and_finished_by_the_other(cluster):
    store = cluster.store
    job = cluster.stub.SubmitJob(jpb.SubmitJobRequest(request=pb.GenerateRequest(
        model="unet", steps=80, num_samples=50, base_seed=7, class_label=1, guidance=1.0)))

    def running_on():  # the consumer holding a task that has made progress
        if not store.redis.hlen(store.keys.job(job.id, "progress")):
            return None
        pending = store.redis.xpending_range(store.keys.stream("normal"), GROUP, "-", "+", 10)
        return pending[0]["consumer"].decode() if pending else None

    victim = wait_for(running_on, 60, "a task to start running")
    survivor = ({"w1", "w2"} - {victim}).pop()
    held = [p["message_id"] for p in store.redis.xpending_range(store.keys.stream("normal"), GROUP, "-", "+", 10)
            if p["consumer"].decode() == victim]
    os.kill(cluster.procs[victim].pid, signal.SIGKILL)
    cluster.procs[victim].wait(10)
    done = wait_done(cluster.stub, job.id, timeout=180)
    assert done.state == jpb.JOB_STATE_SUCCEEDED and done.samples_done == 50 and done.tasks_done == 2
    results = task_results(store, job.id)
    assert sorted(results) == [0, 1]  # exactly one result per task
    reclaimed = [r for r in results.values() if r.attempt == 2]
    assert len(reclaimed) == len(held) >= 1 and all(r.worker == survivor for r in reclaimed)
    assert store.redis.xpending(store.keys.stream("normal"), GROUP)["pending"] == 0
    seeds = [s.seed for s in all_samples(cluster.stub, job.id)]
    assert seeds == list(range(7, 57))


def test_redis_killed_and_restarted_loses_no_accepted_job(cluster):
    stub, store = cluster.stub, cluster.store
    accepted = [stub.SubmitJob(jpb.SubmitJobRequest(request=pb.GenerateRequest(
        model="unet", steps=30, num_samples=50, base_seed=100 * k, class_label=k, guidance=1.0))).id
        for k in range(3)]
    wait_for(lambda: store.redis.hlen(store.keys.job(accepted[0], "progress")), 60, "the first job to run")
    cluster.redis.kill()
    with pytest.raises(grpc.RpcError) as info:
        stub.GetJob(jpb.GetJobRequest(id=accepted[0]))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    time.sleep(1.0)
    cluster.redis.start()  # same port, same data directory: the AOF brings back jobs, streams and the group
    for job_id in accepted:
        done = wait_done(stub, job_id, timeout=180)
        assert done.state == jpb.JOB_STATE_SUCCEEDED and done.samples_done == 50
        assert sorted(task_results(store, job_id)) == [0, 1]
