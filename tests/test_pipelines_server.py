"""Latent text-to-image pipelines through the server: prompts, negative prompts and sizes over gRPC, the same
images as the library path, requests with different prompts sharing forward passes, clear refusals."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from models.pipelines.generate import PipelineRequest, generate
from server.client import tensor_to_array
from tests.pipeline_fixtures import load_served, tiny_sd
from tests.server_fixtures import pb, running_server, stub_for

H, W = 32, 24


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    tiny_sd(root / "sd")
    loaded = load_served(root, "tiny-sd", "sd", default_sampler="dpmpp_2m", default_steps=4)
    with running_server({"tiny-sd": loaded}) as server:
        stub, channel = stub_for(server)
        yield server, stub, loaded
        channel.close()


def _images(response):
    return np.stack([tensor_to_array(s.tensor) for s in response.samples])


def test_prompts_sizes_and_negative_prompts_over_grpc_equal_the_library(served):
    server, stub, loaded = served
    out = stub.Generate(pb.GenerateRequest(model="tiny-sd", prompt="a red cube", negative_prompt="blurry",
                                           height=H, width=W, steps=4, num_samples=2, base_seed=7, guidance=3.0,
                                           format=pb.TENSOR))
    images = _images(out)
    assert images.shape == (2, 3, H, W) and [s.seed for s in out.samples] == [7, 8] and out.nfe == 4
    direct = generate(loaded.model, PipelineRequest(seeds=[7, 8], prompts="a red cube", negative_prompts="blurry",
                                                    height=H, width=W, steps=4, sampler="dpmpp_2m", guidance=3.0))
    assert float(np.abs(images - direct.images.numpy()).max()) < 1e-5


def test_requests_with_different_prompts_share_forward_passes(served):
    server, stub, loaded = served
    loop = server.engine.models["tiny-sd"].loop
    prompts = ["a red cube", "a blue ball", "a green tree", "a cat"]

    def run(prompt):
        return _images(stub.Generate(pb.GenerateRequest(model="tiny-sd", prompt=prompt, height=H, width=W, steps=4,
                                                        base_seed=1, format=pb.TENSOR)))

    alone = [run(p) for p in prompts]
    before = loop.forwards
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    # alone: 1 encode + 4 denoiser steps + 1 decode = 6 forwards each; together they share passes
    assert loop.forwards - before < 6 * len(prompts)
    for a, b in zip(alone, together):
        assert float(np.abs(a - b).max()) < 1e-4


def test_model_info_says_what_the_pipeline_takes(served):
    _, stub, loaded = served
    info = stub.GetModel(pb.GetModelRequest(name="tiny-sd"))
    assert info.family == "sd" and info.takes_prompt and info.kind == "diffusion" and info.ready
    assert info.size_multiple == loaded.model.factor and info.layout == "CHW" and not info.takes_distilled_guidance
    assert (info.default_height, info.default_width) == loaded.model.default_size


@pytest.mark.parametrize("fields,fragment", [
    (dict(), "prompt: model 'tiny-sd' needs a prompt"),
    (dict(prompt="x", height=H + 1, width=W), "height"),
    (dict(prompt="x", class_label=3), "class_label"),
    (dict(prompt="x", sampler="meanflow"), "does not apply"),
    (dict(prompt="x", distilled_guidance=3.5), "distilled_guidance"),
    (dict(prompt="x", grid="karras"), "grid"),
])
def test_bad_pipeline_requests_name_the_field(served, fields, fragment):
    _, stub, _ = served
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(model="tiny-sd", steps=2, **fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()


def test_prompts_on_an_image_model_without_text_are_refused():
    from tests.server_fixtures import gmm_model

    with running_server({"gmm": gmm_model()}) as server:
        stub, channel = stub_for(server)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(model="gmm", prompt="a cat"))
        channel.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a text-to-image" in info.value.details()


def test_the_command_line_generates_the_same_images_in_process_and_over_the_server(served, tmp_path):
    from server.cli import main as cli_main

    server, _, loaded = served
    config = loaded.entry.directory.parent / "models.toml"
    args = ["generate", "--config", str(config), "--model", "tiny-sd", "--prompt", "a red cube", "--negative-prompt",
            "blurry", "--height", str(H), "--width", str(W), "--steps", "3", "--n", "2", "--seed", "5", "--guidance",
            "2.5", "--format", "npy", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "local.npy")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "remote.npy"), "--server", f"127.0.0.1:{server.port}"]) == 0
    local, remote = np.load(tmp_path / "local.npy"), np.load(tmp_path / "remote.npy")
    direct = generate(loaded.model, PipelineRequest(seeds=[5, 6], prompts="a red cube", negative_prompts="blurry",
                                                    height=H, width=W, steps=3, sampler="dpmpp_2m", guidance=2.5))
    assert local.shape == (2, 3, H, W) and local.dtype == np.float32
    assert float(np.abs(local - direct.images.numpy()).max()) < 1e-5
    assert float(np.abs(remote - local).max()) < 1e-5

