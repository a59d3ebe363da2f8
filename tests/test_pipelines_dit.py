"""DiT through models/pipelines against diffusers' DiTPipeline (tiny random weights, learned sigma)."""

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler

from models.pipelines import load_pipeline
from models.pipelines.generate import PipelineRequest, generate
from tests.pipeline_fixtures import tiny_dit

SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
LABELS = [3, 917]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dit") / "dit"
    tiny_dit(directory)
    theirs = DiTPipeline.from_pretrained(directory, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    return theirs, load_pipeline(directory, "tiny-dit")


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_images_equal_diffusers(both, sampler, guidance):
    theirs, ours = both
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    expected = theirs(class_labels=LABELS, guidance_scale=guidance, num_inference_steps=5,
                      generator=torch.Generator().manual_seed(2), output_type="pt").images
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    result = generate(ours, PipelineRequest(seeds=[0, 1], class_labels=LABELS, steps=5, sampler=sampler,
                                            guidance=guidance, latents=latents))
    assert result.images.shape == (2, 3, 16, 16)
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


def test_labels_and_sizes_are_checked(both):
    _, ours = both
    with pytest.raises(Exception, match="class_label"):
        generate(ours, PipelineRequest(seeds=[0], class_labels=[1000], steps=2))
    with pytest.raises(Exception, match="class_label"):
        generate(ours, PipelineRequest(seeds=[0], steps=2))
    with pytest.raises(Exception, match="generates only at"):
        generate(ours, PipelineRequest(seeds=[0], class_labels=[1], height=32, width=32, steps=2))


def test_describe_says_what_the_model_takes(both):
    _, ours = both
    info = ours.describe()
    assert (info["family"], info["takes_prompt"], info["num_classes"], info["null_class"]) == ("dit", False, 1000,
                                                                                               1000)
    assert info["sizes"] == [(16, 16)] and info["default_guidance"] == 4.0


@pytest.mark.parametrize("field,value,match", [("steps", 0, "steps"), ("steps", 2.5, "steps"),
                                               ("sampler", "nope", "sampler"), ("sampler", "meanflow", "sampler"),
                                               ("options", {"eta": 7.0}, "option")])
def test_bad_requests_are_refused_before_any_network_call(both, field, value, match):
    from samplers.errors import InvalidRequest

    _, ours = both
    request = dict(seeds=[0], class_labels=[1], steps=2, sampler="ddim", guidance=2.0)
    request[field] = value
    with pytest.raises(InvalidRequest, match=match):
        generate(ours, PipelineRequest(**request))
