"""The job API over a real redis-server, with workers in this process (exact GMM models): results, paging,
idempotency, cancellation, poison tasks, TTL, priorities, bad ids, Redis outages, metrics and the CLI."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY, generate_latest

from models.config import ConfigError
from server import metrics
from server import queue_metrics as qm
from server.cli import main as cli_main
from server.client import tensor_to_array
from server.generation import GenerateRequest, generate
from server.jobs_servicer import make_jobs_servicer
from server.queue.local import HOW_TO_GET, LocalRedis
from tests.queue_fixtures import (
    jobs_server,
    jpb,
    redis_server,
    settings,
    wait_done,
    wait_for,
    worker_threads,
)
from tests.server_fixtures import gmm_model, pb


def models():
    return {"gmm": gmm_model(), "slow": gmm_model("slow", delay=0.02), "broken": gmm_model("broken", nan_label=7)}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def config(redis_url):
    return settings(redis_url)


@pytest.fixture
def api(config):
    with jobs_server(models(), config) as api:
        yield api


def submit(stub, **request):
    key, priority = request.pop("idempotency_key", ""), request.pop("priority", jpb.JOB_PRIORITY_NORMAL)
    return stub.SubmitJob(jpb.SubmitJobRequest(request=pb.GenerateRequest(**request), idempotency_key=key,
                                               priority=priority))


def code_of(call, *args):
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if hasattr(result, "__next__"):
            next(result)
    return info.value.code(), info.value.details()


def test_job_results_equal_direct_generation_page_by_page(api, config):
    stub, _, _ = api
    request = dict(model="gmm", sampler="unipc", steps=6, num_samples=50, base_seed=100, class_label=2, guidance=1.5,
                   format=pb.TENSOR)
    with worker_threads(models, config, count=2):
        job = submit(stub, **request)
        assert job.state == jpb.JOB_STATE_QUEUED and job.tasks_total == 7 and job.task_size == 8
        done = wait_done(stub, job.id)
    assert done.state == jpb.JOB_STATE_SUCCEEDED and done.samples_done == 50 and done.progress == 1.0
    assert done.finished_unix >= done.started_unix >= done.created_unix > 0 and done.expires_unix > done.finished_unix
    pages, token = [], ""
    while True:
        page = stub.GetJobResults(jpb.GetJobResultsRequest(id=job.id, page_size=7, page_token=token))
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    assert [p.offset for p in pages] == list(range(0, 50, 7)) and all(p.total_samples == 50 for p in pages)
    samples = [s for p in pages for s in p.samples]
    assert [s.seed for s in samples] == list(range(100, 150)) and pages[0].nfe == 6
    direct = generate(gmm_model(), GenerateRequest("unipc", 6, n=50, seed=100, class_label=2, guidance=1.5))
    queued = np.stack([tensor_to_array(s.tensor) for s in samples])
    assert np.abs(queued - direct.samples.float().numpy()).max() < 1e-6
    for token in ("abc", "50", "-1"):
        code, message = code_of(stub.GetJobResults, jpb.GetJobResultsRequest(id=job.id, page_token=token))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in message


def test_results_of_an_unfinished_job_are_a_failed_precondition(api):
    stub, _, _ = api
    job = submit(stub, model="gmm", num_samples=3)  # no worker: stays queued
    code, message = code_of(stub.GetJobResults, jpb.GetJobResultsRequest(id=job.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "queued" in message


def test_idempotency_key_returns_the_existing_job(api, config):
    stub, store, _ = api
    first = submit(stub, model="gmm", num_samples=20, idempotency_key="eval-run:7")
    again = submit(stub, model="gmm", num_samples=20, idempotency_key="eval-run:7")
    assert again.id == first.id
    with ThreadPoolExecutor(8) as pool:  # concurrent resubmits: still one job
        ids = set(pool.map(lambda _: submit(stub, model="gmm", num_samples=5, idempotency_key="burst").id, range(8)))
    assert len(ids) == 1
    assert len(stub.ListJobs(jpb.ListJobsRequest()).jobs) == 2
    assert store.stats()["streams"]["normal"]["length"] == 3 + 1  # 20 samples = 3 tasks, 5 samples = 1 task
    code, message = code_of(lambda: submit(stub, model="gmm", num_samples=21, idempotency_key="eval-run:7"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and first.id in message
    code, _ = code_of(lambda: submit(stub, model="gmm", idempotency_key="has space"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_cancelled_queued_job_is_dropped_without_compute(api, config):
    stub, store, _ = api
    job = submit(stub, model="gmm", num_samples=40)
    cancelled = stub.CancelJob(jpb.CancelJobRequest(id=job.id))
    assert cancelled.state == jpb.JOB_STATE_CANCELLED and "cancelled" in cancelled.error
    dropped = qm.TASKS_DROPPED._value.get()
    before = metrics.REQUESTS.labels("gmm", "dpmpp_2m", "ok")._value.get()
    with worker_threads(models, config):
        wait_for(lambda: store.stats()["streams"]["normal"]["lag"] == 0, 10, "the worker to take the tasks")
        wait_for(lambda: qm.TASKS_DROPPED._value.get() == dropped + 5, 10, "the tasks to be dropped")
    assert metrics.REQUESTS.labels("gmm", "dpmpp_2m", "ok")._value.get() == before  # nothing computed
    after = stub.GetJob(jpb.GetJobRequest(id=job.id))
    assert after.state == jpb.JOB_STATE_CANCELLED and after.samples_done == 0 and after.tasks_done == 0
    assert stub.CancelJob(jpb.CancelJobRequest(id=job.id)).state == jpb.JOB_STATE_CANCELLED


def test_cancelling_a_running_job_stops_its_task_within_a_step(api, config):
    stub, _, _ = api
    with worker_threads(models, config) as (worker,):
        before = metrics.REQUESTS.labels("slow", "dpmpp_2m", "cancelled")._value.get()
        job = submit(stub, model="slow", steps=500, num_samples=4)  # 500 steps x 20 ms: 10 s of compute
        wait_for(lambda: stub.GetJob(jpb.GetJobRequest(id=job.id)).progress > 0, 20, "the task to run")
        start = time.monotonic()
        stub.CancelJob(jpb.CancelJobRequest(id=job.id))
        wait_for(lambda: not worker._held, 5, "the worker to let the task go", every=0.01)
        stopped = time.monotonic() - start
        assert metrics.REQUESTS.labels("slow", "dpmpp_2m", "cancelled")._value.get() == before + 1
    assert stopped < 2.0  # the compute thread stopped at its next step, not after 10 s
    job = stub.GetJob(jpb.GetJobRequest(id=job.id))
    assert job.state == jpb.JOB_STATE_CANCELLED and job.tasks_done == 0
    finished = stub.GetJob(jpb.GetJobRequest(id=job.id))
    assert stub.CancelJob(jpb.CancelJobRequest(id=job.id)) == finished  # cancelling an ended job changes nothing


def test_poison_task_is_retried_then_dead_lettered_and_other_jobs_finish(api, config):
    stub, store, _ = api
    retried = qm.TASKS_RETRIED.labels("broken")._value.get()
    dead = qm.TASKS_DEAD.labels("broken")._value.get()
    with worker_threads(models, config, count=2):
        poison = submit(stub, model="broken", class_label=7, num_samples=4, steps=3)  # NaN from the model
        healthy = [submit(stub, model=m, class_label=7, num_samples=16, steps=3) for m in ("gmm", "broken")[:1]]
        healthy.append(submit(stub, model="broken", class_label=3, num_samples=16, steps=3))
        failed = wait_done(stub, poison.id)
        ok = [wait_done(stub, j.id) for j in healthy]
    assert failed.state == jpb.JOB_STATE_FAILED and failed.retries == 2
    assert "task 1 of 1 (samples 0-3) failed 3 times" in failed.error and "NaN" in failed.error
    assert all(j.state == jpb.JOB_STATE_SUCCEEDED and j.samples_done == 16 for j in ok)
    letters = store.redis.xrange(store.keys.dead)
    assert len(letters) == 1 and letters[0][1][b"job"].decode() == poison.id and letters[0][1][b"attempts"] == b"3"
    assert qm.TASKS_RETRIED.labels("broken")._value.get() == retried + 2
    assert qm.TASKS_DEAD.labels("broken")._value.get() == dead + 1
    assert store.stats()["dead_letters"] == 1


def test_a_task_whose_workers_keep_dying_is_dead_lettered(redis_url):
    from server.queue.keys import GROUP

    config = settings(redis_url, queue_max_attempts=2, queue_visibility_timeout=0.3)
    with jobs_server(models(), config) as (stub, store, _):
        job = submit(stub, model="gmm", num_samples=4)
        stream = store.keys.stream("normal")
        # two consumers take the task and vanish without acknowledging it (as a worker killed by it would)
        assert store.redis.xreadgroup(GROUP, "ghost-1", {stream: ">"}, count=1)
        time.sleep(0.4)
        assert store.redis.xautoclaim(stream, GROUP, "ghost-2", 300, "0-0", count=1)[1]
        time.sleep(0.4)
        with worker_threads(models, config):
            failed = wait_done(stub, job.id)
    assert failed.state == jpb.JOB_STATE_FAILED and failed.samples_done == 0
    assert "failed 2 times" in failed.error and "stopped responding" in failed.error


def test_results_expire_with_their_job(redis_url):
    config = settings(redis_url, queue_result_ttl=1.0)
    with jobs_server(models(), config) as (stub, store, _), worker_threads(models, config):
        job = wait_done(stub, submit(stub, model="gmm", num_samples=10, steps=2).id)
        assert job.state == jpb.JOB_STATE_SUCCEEDED and abs(job.expires_unix - job.finished_unix - 1.0) < 1e-3
        assert len(stub.GetJobResults(jpb.GetJobResultsRequest(id=job.id)).samples) == 10
        wait_for(lambda: not store.redis.keys(f"{config.queue_prefix}:job:{job.id}*"), 5, "the job's keys to expire")
        assert not store.redis.keys(f"{config.queue_prefix}:idem:*")
        for call, request in ((stub.GetJob, jpb.GetJobRequest(id=job.id)),
                              (stub.GetJobResults, jpb.GetJobResultsRequest(id=job.id))):
            assert code_of(call, request)[0] == grpc.StatusCode.NOT_FOUND
        assert stub.ListJobs(jpb.ListJobsRequest()).jobs == []
        assert store.stats()["jobs"]["succeeded"] == 0


def test_higher_priority_jobs_start_first(api, config):
    stub, _, _ = api
    low = submit(stub, model="gmm", num_samples=2, priority=jpb.JOB_PRIORITY_LOW)
    normal = submit(stub, model="gmm", num_samples=2)
    high = submit(stub, model="gmm", num_samples=2, priority=jpb.JOB_PRIORITY_HIGH)
    with worker_threads(models, config, concurrency=1):
        started = [wait_done(stub, j.id).started_unix for j in (high, normal, low)]
    assert started == sorted(started)
    listed = stub.ListJobs(jpb.ListJobsRequest(page_size=2))
    assert [j.id for j in listed.jobs] == [high.id, normal.id] and listed.next_page_token
    rest = stub.ListJobs(jpb.ListJobsRequest(page_size=2, page_token=listed.next_page_token))
    assert [j.id for j in rest.jobs] == [low.id] and not rest.next_page_token
    assert stub.ListJobs(jpb.ListJobsRequest(state=jpb.JOB_STATE_RUNNING)).jobs == []


@pytest.mark.parametrize("bad", ["", "xyz", "../../etc/passwd", "A" * 32, "0" * 33, "0123456789abcdef*"])
def test_malformed_job_ids_are_invalid_and_unknown_ones_not_found(api, bad):
    stub, _, _ = api
    calls = [(stub.GetJob, jpb.GetJobRequest), (stub.WatchJob, jpb.GetJobRequest),
             (stub.CancelJob, jpb.CancelJobRequest), (stub.GetJobResults, jpb.GetJobResultsRequest)]
    for call, message in calls:
        code, details = code_of(call, message(id=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a job id" in details
        assert code_of(call, message(id=uuid.uuid4().hex))[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("request_kwargs,code,fragment", [
    (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "no served model named 'nope'"),
    (dict(model="gmm", num_samples=200_001), grpc.StatusCode.INVALID_ARGUMENT, "num_samples"),
    (dict(model="gmm", sampler="nope"), grpc.StatusCode.INVALID_ARGUMENT, "unknown sampler"),
    (dict(model="gmm", steps=5000), grpc.StatusCode.INVALID_ARGUMENT, "steps"),
    (dict(model="gmm", class_label=12), grpc.StatusCode.INVALID_ARGUMENT, "class_label"),
    (dict(model="gmm", guidance=3.0), grpc.StatusCode.INVALID_ARGUMENT, "guidance"),
    (dict(model="gmm", preview_every=2), grpc.StatusCode.INVALID_ARGUMENT, "preview_every"),
    (dict(model="gmm", format=pb.TEXT), grpc.StatusCode.INVALID_ARGUMENT, "TEXT"),
    (dict(model="gmm", num_samples=2, seeds=[1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT, "seeds"),
])
def test_bad_submissions_get_clear_status_codes(api, request_kwargs, code, fragment):
    stub, store, _ = api
    got, details = code_of(lambda: submit(stub, **request_kwargs))
    assert got == code and fragment in details
    assert store.redis.keys(f"{store.keys.prefix}:job:*") == []  # nothing queued


def test_queue_rpcs_are_unavailable_while_redis_is_down_then_resume(tmp_path):
    server = LocalRedis(tmp_path / "redis", extra_args=("--requirepass", "pa55word")).start()
    try:
        url = f"redis://:pa55word@127.0.0.1:{server.port}/0"
        config = settings(url)
        with jobs_server(models(), config) as (stub, _, _), worker_threads(models, config):
            job = wait_done(stub, submit(stub, model="gmm", num_samples=8, steps=2).id)
            server.kill()
            start = time.monotonic()
            code, details = code_of(stub.GetJob, jpb.GetJobRequest(id=job.id))
            assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in details and "pa55word" not in details
            assert time.monotonic() - start < 5  # fails fast
            assert code_of(lambda: submit(stub, model="gmm"))[0] == grpc.StatusCode.UNAVAILABLE
            server.start()
            assert stub.GetJob(jpb.GetJobRequest(id=job.id)).state == jpb.JOB_STATE_SUCCEEDED
            after = wait_done(stub, submit(stub, model="gmm", num_samples=8, steps=2).id)  # the worker reconnected
            assert after.state == jpb.JOB_STATE_SUCCEEDED
        wrong = settings(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with jobs_server(models(), wrong) as (stub, _, _):
            code, details = code_of(stub.GetJob, jpb.GetJobRequest(id=job.id))
            assert code == grpc.StatusCode.UNAVAILABLE and "refused the credentials" in details
            assert "wrong" not in details
    finally:
        server.stop()


def test_without_redis_queue_rpcs_say_how_to_get_it():
    from dataclasses import replace

    from server.app import start_server
    from server.config import ServerConfig
    from server.jobs_servicer import jobs_service
    from tests.queue_fixtures import jgrpc

    config = replace(ServerConfig(), port=0, metrics_port=None)
    server = start_server({"gmm": gmm_model()}, config, services=[jobs_service(None, config, HOW_TO_GET)])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        code, details = code_of(lambda: submit(jgrpc.JobsStub(channel), model="gmm"))
        assert code == grpc.StatusCode.UNAVAILABLE and "apt-get install redis-server" in details
    finally:
        channel.close()
        server.stop(grace=1.0)


def test_serve_starts_a_local_redis_with_aof_and_a_worker(tmp_path, monkeypatch):
    """What `diffserve serve` (make serve) sets up without a Redis URL, and without a redis-server binary."""
    from dataclasses import replace

    from server.engine import Engine
    from server.queue.local import free_port
    from server.queue.runtime import QueueRuntime

    config = replace(settings("unused"), redis_url=None)
    runtime = QueueRuntime(config, run_dir=tmp_path / "run", port=free_port())
    engine = Engine(models(), config)
    try:
        engine.warm_up()
        assert runtime.local is not None and runtime.local.data_dir == (tmp_path / "run" / "redis").resolve()
        assert runtime.store.redis.config_get("appendonly")["appendonly"] == "yes"
        runtime.start_worker(engine)
        assert runtime.worker is not None
        job_id, _ = runtime.store.submit(_spec(), config.queue_result_ttl)
        wait_for(lambda: runtime.store.record(job_id)["state"] == "succeeded", 20, "the local worker")
    finally:
        runtime.stop_worker(2.0)
        runtime.close()
        engine.close()
    assert runtime.local.process.poll() is not None  # the local Redis stops with the server
    assert list((tmp_path / "run" / "redis" / "appendonlydir").iterdir())
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server to be found
    bare = QueueRuntime(config, run_dir=tmp_path / "run2")
    assert bare.store is None and "apt-get install redis-server" in bare.why_unavailable
    with pytest.raises(ConfigError, match="queue_task_size"):
        make_jobs_servicer(None, None, replace(config, queue_task_size=1000))  # above max_samples


def _spec():
    from server.queue.codec import JobSpec

    return JobSpec("gmm", GenerateRequest("dpmpp_2m", 3, n=10, seed=0), pb.TENSOR, 8)


def test_tls_and_acl_user_urls(tmp_path):
    import subprocess

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca", "-keyout", "ca.key",
            "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "r.key", "-out", "r.csr")
    (tmp_path / "r.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "r.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-extfile", "r.ext", "-out", "r.pem")
    from server.queue.local import free_port

    port = free_port()
    tls = ("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tmp_path / "r.pem"), "--tls-key-file",
           str(tmp_path / "r.key"), "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
           "--user", "default", "off", "--user", "alice", "on", ">s3cret", "~*", "&*", "+@all")
    url = f"rediss://alice:s3cret@localhost:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
    with redis_server(tmp_path / "redis", port=port, extra_args=tls, url=url):
        config = settings(url)
        with jobs_server(models(), config) as (stub, _, _), worker_threads(models, config):
            job = wait_done(stub, submit(stub, model="gmm", num_samples=8, steps=2).id)
            assert job.state == jpb.JOB_STATE_SUCCEEDED
        plain = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # the port speaks TLS only


def test_metrics_report_the_queue(api, config):
    stub, _, _ = api
    with worker_threads(models, config):
        wait_done(stub, submit(stub, model="gmm", num_samples=12, steps=2).id)
        text = generate_latest(REGISTRY).decode()
    for series in ('diffserve_queue_jobs{state="succeeded"} 1.0', 'diffserve_queue_lag{priority="normal"} 0.0',
                   'diffserve_queue_pending{priority="normal"} 0.0', 'diffserve_queue_stream_length{priority="high"}',
                   "diffserve_queue_redis_up 1.0", 'diffserve_queue_tasks_processed_total{model="gmm"}',
                   "diffserve_queue_task_seconds_bucket", "diffserve_queue_task_dispatch_seconds_count",
                   "diffserve_queue_task_store_seconds_count", "diffserve_queue_worker_busy_tasks{worker=",
                   "diffserve_queue_workers 1.0", "diffserve_queue_dead_letters 0.0"):
        assert series in text, series


def test_cli_submit_watch_and_fetch_results(api, config, tmp_path, capsys):
    _, _, address = api
    with worker_threads(models, config):
        assert cli_main(["submit", "--server", address, "--model", "gmm", "--n", "20", "--steps", "3", "--class",
                         "4", "--seed", "7"]) == 0
        job_id = capsys.readouterr().out.strip()
        assert len(job_id) == 32
        assert cli_main(["job", job_id, "--watch", "--quiet", "--server", address]) == 0
        assert "succeeded" in capsys.readouterr().out
    assert cli_main(["results", job_id, "--out", str(tmp_path / "out"), "--page-size", "6", "--server", address]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files[:2] == ["000000.png", "000001.png"] and len(files) == 21 and "seeds.csv" in files
    assert (tmp_path / "out" / "seeds.csv").read_text().splitlines()[1:3] == ["0,7", "1,8"]
    assert cli_main(["job", uuid.uuid4().hex, "--server", address]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
