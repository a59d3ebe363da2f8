"""Text LM jobs through SubmitJob and a worker on a real Redis: prompt and max_new_tokens survive the queue's
codec, tasks of one job split across the worker's batches, and the texts equal the library path's."""

import pytest
import torch

from models.config import load_config
from models.loading import load_model
from tests.queue_fixtures import jobs_server, jpb, redis_server, settings, wait_done, worker_threads
from tests.server_fixtures import pb
from tests.test_lms_served import _library, zoo  # noqa: F401  (zoo: the tiny checkpoints, a fixture)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):  # started before any gRPC server of this module (fork safety)
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def loaded(redis_url, zoo):  # noqa: F811
    torch.set_num_threads(1)
    config = load_config(zoo)
    return {name: load_model(config[name]) for name in ("tiny-gemma", "tiny-mdlm")}


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-mdlm"])
def test_a_queued_lm_job_equals_the_library(redis_url, loaded, name):
    config = settings(redis_url, queue_task_size=2)
    with jobs_server(loaded, config) as (stub, _, _), worker_threads(lambda: loaded, config):
        request = pb.GenerateRequest(model=name, prompt="w2 w3", max_new_tokens=16, num_samples=3, base_seed=21,
                                     format=pb.TEXT)
        job = wait_done(stub, stub.SubmitJob(jpb.SubmitJobRequest(request=request)).id)
        assert job.state == jpb.JOB_STATE_SUCCEEDED, job.error
        page = stub.GetJobResults(jpb.GetJobResultsRequest(id=job.id, page_size=10))
    assert [s.text for s in page.samples] == _library(loaded[name], "w2 w3", 16, [21, 22, 23])
