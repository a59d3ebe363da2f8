"""SDXL through models/pipelines against diffusers' StableDiffusionXLPipeline (tiny random weights)."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from models.pipelines import load_pipeline
from models.pipelines.generate import PipelineRequest, generate
from tests.pipeline_fixtures import PROMPTS, tiny_sdxl

H, W, STEPS = 32, 24, 5
SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module", params=[True, False], ids=["zeros", "empty"])
def both(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sdxl") / "sdxl"
    tiny_sdxl(directory, force_zeros=request.param)
    theirs = StableDiffusionXLPipeline.from_pretrained(directory, local_files_only=True, image_encoder=None,
                                                       feature_extractor=None)
    theirs.set_progress_bar_config(disable=True)
    return theirs, load_pipeline(directory, "tiny-sdxl")


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance,negative", [(1.0, None), (5.0, None), (5.0, ["a dog", "b"])])
def test_images_equal_diffusers(both, sampler, guidance, negative):
    theirs, ours = both
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    latents = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(9))
    expected = theirs(prompt=PROMPTS, negative_prompt=negative, height=H, width=W, num_inference_steps=STEPS,
                      guidance_scale=guidance, latents=latents.clone(), output_type="pt").images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, negative_prompts=negative, height=H,
                                            width=W, steps=STEPS, sampler=sampler, guidance=guidance,
                                            latents=latents))
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


def test_guidance_rescale_equals_diffusers(both):
    theirs, ours = both
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    latents = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(9))
    expected = theirs(prompt=PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=6.0,
                      guidance_rescale=0.5, latents=latents.clone(), output_type="pt").images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, height=H, width=W, steps=STEPS,
                                            sampler="euler", guidance=6.0, guidance_rescale=0.5, latents=latents))
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4
