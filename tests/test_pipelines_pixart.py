"""PixArt-Sigma through models/pipelines against diffusers' PixArtSigmaPipeline (tiny random weights)."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, PixArtSigmaPipeline

from models.pipelines import load_pipeline
from models.pipelines.generate import PipelineRequest, generate
from tests.pipeline_fixtures import tiny_pixart

H, W, STEPS = 32, 24, 5
PROMPTS = ["A Cat on abc ", "a dog"]
SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pixart") / "pixart"
    tiny_pixart(directory)
    theirs = PixArtSigmaPipeline.from_pretrained(directory, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    return theirs, load_pipeline(directory, "tiny-pixart")


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance,negative", [(1.0, None), (4.5, None), (4.5, "b dog")])
def test_images_equal_diffusers(both, sampler, guidance, negative):
    theirs, ours = both
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    latents = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(4))
    expected = theirs(prompt=PROMPTS, negative_prompt=negative or "", height=H, width=W,
                      num_inference_steps=STEPS, guidance_scale=guidance, latents=latents.clone(),
                      output_type="pt", use_resolution_binning=False, clean_caption=False).images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, negative_prompts=negative, height=H,
                                            width=W, steps=STEPS, sampler=sampler, guidance=guidance,
                                            latents=latents))
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


def test_ddim_is_refused_where_diffusers_would_clip(both):
    """The config has no clip_sample: diffusers' DDIM would clip x0 to [-1, 1]; we refuse, naming the field."""
    _, ours = both
    with pytest.raises(Exception, match="'clip_sample'.*'tiny-pixart'|'tiny-pixart'.*'clip_sample'"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=H, width=W, steps=2, sampler="ddim"))
