"""SD3 through models/pipelines against diffusers' StableDiffusion3Pipeline (tiny random weights, no T5)."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from models.pipelines import load_pipeline
from models.pipelines.generate import PipelineRequest, generate
from tests.pipeline_fixtures import PROMPTS, tiny_sd3

H, W, STEPS = 32, 24, 5


@pytest.fixture(scope="module", params=[False, True], ids=["clip", "clip+t5"])
def both(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sd3") / "sd3"
    tiny_sd3(directory, shift=3.0, t5=request.param)
    without_t5 = {} if request.param else {"text_encoder_3": None, "tokenizer_3": None}
    theirs = StableDiffusion3Pipeline.from_pretrained(directory, local_files_only=True, image_encoder=None,
                                                      feature_extractor=None, **without_t5)
    theirs.set_progress_bar_config(disable=True)
    return theirs, load_pipeline(directory, "tiny-sd3")


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (5.0, None), (5.0, ["a dog", "b"])])
def test_images_equal_diffusers_flow_euler(both, guidance, negative):
    theirs, ours = both
    latents = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    expected = theirs(prompt=PROMPTS, negative_prompt=negative, height=H, width=W, num_inference_steps=STEPS,
                      guidance_scale=guidance, latents=latents.clone(), output_type="pt").images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, negative_prompts=negative, height=H,
                                            width=W, steps=STEPS, sampler="euler", guidance=guidance,
                                            latents=latents))
    assert result.nfe == STEPS
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


def test_every_deterministic_sampler_runs_from_pure_noise(both):
    """The grid starts at t = 1: one exact first-order step, then any sampler on the rest."""
    _, ours = both
    for sampler in ("dpmpp_2m", "dpmpp_3m", "heun", "unipc"):
        result = generate(ours, PipelineRequest(seeds=[0], prompts=["a cat"], height=H, width=W, steps=4,
                                                sampler=sampler, guidance=3.0))
        assert torch.isfinite(result.images).all() and result.images.abs().max() <= 1


def test_one_step_is_the_prior_prediction(both):
    _, ours = both
    result = generate(ours, PipelineRequest(seeds=[0], prompts=["a cat"], height=H, width=W, steps=1))
    assert result.nfe == 1 and torch.isfinite(result.images).all()


def test_the_hook_counts_the_prior_step(both):
    _, ours = both
    seen = []
    generate(ours, PipelineRequest(seeds=[0], prompts=["a cat"], height=H, width=W, steps=4, sampler="dpmpp_2m"),
             hook=seen.append)
    assert [(i.step, i.steps) for i in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert seen[-1].nfe == 4 and seen[-1].sigma_next == 0


def test_hundreds_of_steps_stay_in_the_models_range(both):
    _, ours = both
    sigmas = ours.grid(800, "euler", H, W)
    assert sigmas[1] < ours.denoiser.sigma_max and sigmas[-2] > ours.denoiser.sigma_min
