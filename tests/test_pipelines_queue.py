"""A text-to-image job through SubmitJob and a worker on a real Redis: prompts, negative prompts and sizes
survive the queue's codec, and the images equal the library path's."""

import numpy as np
import pytest

from models.pipelines.generate import PipelineRequest, generate
from server.client import tensor_to_array
from tests.pipeline_fixtures import load_served, tiny_sd
from tests.queue_fixtures import jobs_server, jpb, redis_server, settings, wait_done, worker_threads
from tests.server_fixtures import pb

H, W = 32, 24


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):  # started before any gRPC server of this module (fork safety)
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def loaded(redis_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    tiny_sd(root / "sd")
    return load_served(root, "tiny-sd", "sd", default_sampler="dpmpp_2m", default_steps=4)


def test_a_queued_text_to_image_job_equals_the_library(redis_url, loaded):
    config = settings(redis_url, queue_task_size=2)
    with jobs_server({"tiny-sd": loaded}, config) as (stub, _, _), worker_threads(lambda: {"tiny-sd": loaded}, config):
        request = pb.GenerateRequest(model="tiny-sd", prompt="a red cube", negative_prompt="blurry", height=H,
                                     width=W, steps=3, num_samples=3, base_seed=11, guidance=2.0, format=pb.TENSOR)
        job = wait_done(stub, stub.SubmitJob(jpb.SubmitJobRequest(request=request)).id)
        assert job.state == jpb.JOB_STATE_SUCCEEDED, job.error
        page = stub.GetJobResults(jpb.GetJobResultsRequest(id=job.id, page_size=10))
        images = np.stack([tensor_to_array(s.tensor) for s in page.samples])
    direct = generate(loaded.model, PipelineRequest(seeds=[11, 12, 13], prompts="a red cube", negative_prompts="blurry",
                                                    height=H, width=W, steps=3, sampler="dpmpp_2m", guidance=2.0))
    assert images.shape == (3, 3, H, W) and float(np.abs(images - direct.images.numpy()).max()) < 1e-5


def test_a_queued_search_on_a_pipeline_equals_the_library(redis_url, loaded):
    from server.generation import generate as generate_request
    from server.requests import GenerateRequest, SearchRequest

    config = settings(redis_url, queue_task_size=2)
    spec = pb.SearchSpec(method="best_of_n", budget_nfe=12, verifier="ink-mass")
    with jobs_server({"tiny-sd": loaded}, config) as (stub, _, _), worker_threads(lambda: {"tiny-sd": loaded}, config):
        request = pb.GenerateRequest(model="tiny-sd", prompt="a red cube", height=H, width=W, steps=3, num_samples=2,
                                     base_seed=5, guidance=2.0, search=spec, format=pb.TENSOR)
        job = wait_done(stub, stub.SubmitJob(jpb.SubmitJobRequest(request=request)).id)
        assert job.state == jpb.JOB_STATE_SUCCEEDED, job.error
        page = stub.GetJobResults(jpb.GetJobResultsRequest(id=job.id, page_size=10))
        images = np.stack([tensor_to_array(s.tensor) for s in page.samples])
        rewards = [s.reward for s in page.samples]
    direct = generate_request(loaded, GenerateRequest(sampler="", steps=3, n=2, seed=5, prompt="a red cube", height=H,
                                                      width=W, guidance=2.0,
                                                      search=SearchRequest("best_of_n", 12, "ink-mass", {}, {})))
    assert images.shape == (2, 3, H, W) and float(np.abs(images - direct.samples.numpy()).max()) < 1e-5
    assert np.allclose(rewards, direct.rewards, atol=1e-6)
