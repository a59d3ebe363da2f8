"""Issue 16, queue and lifecycle: queued search jobs, draining on SIGTERM, one owner per port and per local
Redis data directory, a stable local Redis URL."""

import uuid

import grpc
import pytest

from samplers.gmm import gmm_image
from server.app import start_server
from server.engine import Engine
from server.jobs_servicer import jobs_service
from server.queue.connection import connect
from server.queue.store import JobStore
from server.queue.worker import Worker
from tests.queue_fixtures import jgrpc, jpb, redis_server, settings, wait_done
from tests.server_fixtures import gmm_model, pb


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


def test_a_queued_search_job_succeeds(redis_url):
    """JobSpec.from_json left `search` a dict: the worker failed every attempt and dead-lettered the job."""
    config = settings(redis_url)
    store = JobStore(config.redis_url, config.queue_prefix)
    server = start_server({"gmm": gmm_model()}, config, services=[jobs_service(store, config)],
                          resources={"mixture": gmm_image()})  # the verifier's resource, checked at submission
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = jgrpc.JobsStub(channel)
    try:
        engine = Engine({"gmm": gmm_model()}, config, {"mixture": gmm_image()})
        engine.warm_up()
        worker = Worker(engine, connect(redis_url, fail_fast=False), redis_url, prefix=config.queue_prefix,
                        name=f"search-{uuid.uuid4().hex[:4]}", concurrency=2, heartbeat_interval=0.3,
                        visibility_timeout=config.queue_visibility_timeout, max_attempts=config.queue_max_attempts)
        worker.start()
        try:
            search = pb.SearchSpec(method="best_of_n", budget_nfe=40, verifier="gmm-component")
            search.verifier_options.update({"component": 3})
            request = pb.GenerateRequest(model="gmm", sampler="ddpm", steps=5, num_samples=3, base_seed=7,
                                         search=search, format=pb.TENSOR)
            job = stub.SubmitJob(jpb.SubmitJobRequest(request=request))
            done = wait_done(stub, job.id)
        finally:
            worker.stop(2.0)
            engine.close()
        assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
        assert done.retries == 0
        page = stub.GetJobResults(jpb.GetJobResultsRequest(id=job.id))
        assert [s.seed for s in page.samples] == [7, 8, 9]
        assert all(s.HasField("reward") for s in page.samples)
    finally:
        channel.close()
        server.stop(grace=1.0)


def test_a_job_spec_keeps_its_png_scale():
    from server.generation import GenerateRequest
    from server.queue.codec import JobSpec

    spec = JobSpec("gmm", GenerateRequest("ddim", 3, n=4), pb.PNG, 2, png_scale=3)
    again = JobSpec.from_json(spec.to_json())
    assert again == spec and again.png_scale == 3
    assert JobSpec.from_json(JobSpec("gmm", spec.request, pb.PNG, 2).to_json()).png_scale == 1
    assert spec.request_hash() != JobSpec("gmm", spec.request, pb.PNG, 2).request_hash()
