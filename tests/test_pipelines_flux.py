"""FLUX through models/pipelines against diffusers' FluxPipeline (tiny random weights, CLIP + T5)."""

import pytest
import torch
from diffusers import FluxPipeline

from models.pipelines import load_pipeline
from models.pipelines.flux import pack, unpack
from models.pipelines.generate import PipelineRequest, generate
from tests.pipeline_fixtures import PROMPTS, tiny_flux

H, W, STEPS = 32, 24, 4


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def both(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("flux") / "flux"
    tiny_flux(directory, guidance_embeds=request.param)
    theirs = FluxPipeline.from_pretrained(directory, local_files_only=True, image_encoder=None,
                                          feature_extractor=None)
    theirs.set_progress_bar_config(disable=True)
    return theirs, load_pipeline(directory, "tiny-flux")


@pytest.mark.parametrize("true_cfg,negative", [(1.0, None), (4.0, ["a dog", "b"])])
def test_images_equal_diffusers(both, true_cfg, negative):
    theirs, ours = both
    latents = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(5))
    expected = theirs(prompt=PROMPTS, negative_prompt=negative, true_cfg_scale=true_cfg, guidance_scale=2.5,
                      height=H, width=W, num_inference_steps=STEPS, latents=pack(latents.clone()),
                      output_type="pt").images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, negative_prompts=negative, height=H,
                                            width=W, steps=STEPS, sampler="euler", guidance=true_cfg,
                                            distilled_guidance=2.5, latents=latents))
    assert result.nfe == STEPS
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


def test_pack_is_a_permutation():
    x = torch.randn(2, 4, 6, 8)
    assert pack(x).shape == (2, 12, 16)
    assert torch.equal(unpack(pack(x), 6, 8), x)


def test_sizes_must_be_multiples_of_the_packed_patch(both):
    _, ours = both
    with pytest.raises(Exception, match="multiple of 4"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=30, width=W, steps=2))
