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


@pytest.mark.parametrize("asked", [(64, 100), (300, 90), (256, 256), (17, 33)])
def test_resolution_binning_equals_diffusers(tmp_path, asked):
    """Sample size 32: diffusers bins the request to its 256 table, generates there, resizes and crops back."""
    directory = tmp_path / "pixart"
    tiny_pixart(directory, sample_size=32)
    ours = load_pipeline(directory, "tiny-pixart-32")
    theirs = PixArtSigmaPipeline.from_pretrained(directory, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    height, width = ours.generation_size(*asked)
    assert (height, width) == theirs.image_processor.classify_height_width_bin(*asked, ratios=ours.info["bins"])
    latents = torch.randn(1, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(4))
    expected = theirs(prompt=PROMPTS[:1], height=asked[0], width=asked[1], num_inference_steps=2,
                      guidance_scale=4.5, latents=latents.clone(), output_type="pt", clean_caption=False).images
    result = generate(ours, PipelineRequest(seeds=[0], prompts=PROMPTS[:1], height=asked[0], width=asked[1],
                                            steps=2, sampler="dpmpp_2m", guidance=4.5, latents=latents))
    assert result.images.shape == (1, 3, *asked) == expected.shape
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4
    assert ours.describe()["resolution_binning"] and ours.describe()["size_multiple"] == 1


def test_binning_bounds_the_requested_size(tmp_path):
    from samplers.errors import InvalidRequest

    directory = tmp_path / "pixart"
    tiny_pixart(directory, sample_size=32)
    ours = load_pipeline(directory, "tiny-pixart-32")
    for bad in ((0, 64), (64, 5000), (64.0, 64)):
        with pytest.raises(InvalidRequest, match="tiny-pixart-32"):
            ours.check_size(*bad)


def test_no_binning_without_a_table(both):
    _, ours = both  # sample size 8: diffusers has no bins (it refuses use_resolution_binning), we generate as asked
    assert ours.generation_size(32, 24) == (32, 24) and not ours.describe()["resolution_binning"]


def test_guidance_rescale_is_refused_naming_the_model(both):
    from samplers.errors import InvalidRequest

    _, ours = both
    with pytest.raises(InvalidRequest, match="guidance_rescale: model 'tiny-pixart'"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=H, width=W, steps=2, guidance=4.5,
                                       guidance_rescale=0.5))
