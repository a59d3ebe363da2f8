"""clip_sample and thresholding: the model's own scheduler clips x0_hat in every step; so does our loaded model.

A tiny random UNet2DModel is saved with a DDPM / DDIM scheduler whose `clip_sample` or `thresholding` is on;
our pixel loader reads it and our `ddpm` / `ddim` samplers run it over the scheduler's own timesteps; the
reference is diffusers' scheduler `step` loop written here, from the same initial noise (and, for DDPM, the
same per-step noise); DDIM's step runs with `use_clipped_model_output=True` (see `_reference`).  A random
UNet's x0_hat lies far outside [-1, 1], so the clip acts at every step."""

import json
from dataclasses import replace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DModel,
)

from models.diffusers_loader import UnsupportedConfig, load_unet_denoiser, map_scheduler_config
from models.pipelines import load_pipeline
from models.pipelines.generate import PipelineRequest, generate
from samplers import run_sampler, with_guidance
from samplers.denoiser import ClipData, DynamicThreshold
from tests.pipeline_fixtures import PROMPTS, tiny_dit, tiny_sd

STEPS = 8
UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8)
CASES = {  # name -> scheduler options
    "clip": dict(clip_sample=True),
    "clip_range_2": dict(clip_sample=True, clip_sample_range=2.0),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
}


class StepNoise:
    """Our samplers' per-step noise drawn from one float32 generator, in the order diffusers' DDPM draws it."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.gen, dtype=torch.float32).to(x.dtype)


def _save(tmp_path, scheduler, classes=None):
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET, num_class_embeds=classes).eval()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp_path / "scheduler")
    return unet


def _reference(unet, scheduler, x_T, labels=None, guidance=None):
    """diffusers: eps (guided on eps, as its pipelines do) -> scheduler.step, which clips x0_hat."""
    scheduler.set_timesteps(STEPS)
    gen, x = torch.Generator().manual_seed(5), x_T.clone()
    for t in scheduler.timesteps:
        with torch.no_grad():
            if guidance is None:
                eps = unet(x, t, class_labels=labels).sample
            else:
                null = torch.full_like(labels, unet.config.num_class_embeds - 1)
                e_c, e_u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
        # DDIM: eps re-derived from the clipped x0_hat (GLIDE's convention, diffusers' use_clipped_model_output);
        # its default pairs the clipped x0_hat with the raw eps, which no data prediction can express
        kw = {"generator": gen} if isinstance(scheduler, DDPMScheduler) else {"use_clipped_model_output": True}
        x = scheduler.step(eps, t, x, **kw).prev_sample
    return x


def _ours(model, scheduler, sampler, x_T, labels=None, guidance=None):
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps.to(torch.float64)
    sigmas = torch.cat([model.process.kappa(t), torch.zeros(1, dtype=torch.float64)])
    x = x_T.to(torch.float64) / model.process.alpha(t[:1]).item()
    out, _ = run_sampler(sampler, with_guidance(model, guidance), x, sigmas, labels, noise=StepNoise(5))
    return out.float()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cls,sampler", [(DDPMScheduler, "ddpm"), (DDIMScheduler, "ddim")])
def test_clipped_sampling_equals_the_diffusers_scheduler(tmp_path, case, cls, sampler):
    unet = _save(tmp_path, cls(**CASES[case]))
    model, mapping = load_unet_denoiser(tmp_path, model="cat")
    expected_clip = DynamicThreshold(0.9, 3.0) if case == "threshold" else ClipData(CASES[case].get(
        "clip_sample_range", 1.0))
    assert model.data_clip == expected_clip == mapping.data_clip
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = _reference(unet, cls.from_pretrained(tmp_path / "scheduler"), x_T)
    ours = _ours(model, cls.from_pretrained(tmp_path / "scheduler"), sampler, x_T)
    assert (ours - expected).abs().max().item() <= 1e-4
    # the clip matters here: the same model without it ends elsewhere
    unclipped = _ours(replace(model, data_clip=None), cls.from_pretrained(tmp_path / "scheduler"), sampler, x_T)
    assert (unclipped - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", ["clip", "threshold"])
def test_guidance_is_clipped_after_the_combination(tmp_path, case):
    unet = _save(tmp_path, DDIMScheduler(**CASES[case]), classes=11)
    model, _ = load_unet_denoiser(tmp_path, null_class=10)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([2, 7])
    expected = _reference(unet, DDIMScheduler.from_pretrained(tmp_path / "scheduler"), x_T, labels, 3.0)
    ours = _ours(model, DDIMScheduler.from_pretrained(tmp_path / "scheduler"), "ddim", x_T, labels, 3.0)
    assert (ours - expected).abs().max().item() <= 1e-4


def test_the_default_ddpm_config_clips():
    """diffusers' DDPMScheduler() (and google/ddpm-cat-256's config) has clip_sample: true."""
    config = dict(DDPMScheduler().config, _class_name="DDPMScheduler")
    assert map_scheduler_config(config).data_clip == ClipData(1.0)
    without = {k: v for k, v in config.items() if k != "clip_sample"}
    assert map_scheduler_config(without).data_clip == ClipData(1.0)  # DDPM's default
    assert map_scheduler_config(dict(config, clip_sample=False)).data_clip is None


@pytest.mark.parametrize("cls,field", [("EulerDiscreteScheduler", "clip_sample"), ("PNDMScheduler", "clip_sample"),
                                       ("EulerDiscreteScheduler", "thresholding"), ("PNDMScheduler", "thresholding")])
def test_a_field_the_own_scheduler_ignores_is_refused_naming_it_and_the_model(cls, field):
    config = dict(DDPMScheduler().config, _class_name=cls, clip_sample=False)
    config[field] = True
    with pytest.raises(UnsupportedConfig, match=f"model 'cat': scheduler config field '{field}' = true: {cls}"):
        map_scheduler_config(config, "cat")


def test_unipc_without_predict_x0_refuses_thresholding():
    config = {"_class_name": "UniPCMultistepScheduler", "thresholding": True, "predict_x0": False}
    with pytest.raises(UnsupportedConfig, match="'thresholding'"):
        map_scheduler_config(config, "m")


@pytest.mark.parametrize("field,value", [("use_karras_sigmas", True), ("use_lu_lambdas", True)])
def test_pixel_grid_fields_are_refused_by_name(tmp_path, field, value):
    _save(tmp_path, DPMSolverMultistepScheduler(**{field: value}))
    with pytest.raises(UnsupportedConfig, match=f"model 'px': scheduler config field '{field}'"):
        load_unet_denoiser(tmp_path, model="px")


def test_latent_pipeline_thresholding_equals_diffusers(tmp_path):
    """SD with DPMSolverMultistepScheduler(thresholding): our dpmpp_2m on the pipeline's data clip, guided."""
    directory = tmp_path / "sd"
    tiny_sd(directory, scheduler=DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, thresholding=True,
        dynamic_thresholding_ratio=0.8, sample_max_value=1.5))
    ours = load_pipeline(directory, "tiny-sd")
    assert ours.denoiser.data_clip == DynamicThreshold(0.8, 1.5)
    theirs = StableDiffusionPipeline.from_pretrained(directory, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(7))
    expected = theirs(prompt=PROMPTS, height=32, width=24, num_inference_steps=5, guidance_scale=5.0,
                      latents=latents.clone(), output_type="pt").images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, height=32, width=24, steps=5,
                                            sampler="dpmpp_2m", guidance=5.0, latents=latents))
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


class GlideDDIM(DDIMScheduler):
    """diffusers' DDIM with eps re-derived from the clipped x0_hat (the convention our samplers follow)."""

    def step(self, *args, **kwargs):
        return super().step(*args, use_clipped_model_output=True, **kwargs)


def test_latent_pipeline_clip_sample_equals_diffusers(tmp_path):
    """DiT with DDIMScheduler(clip_sample, range 0.5), guided: our ddim against DiTPipeline's own loop."""
    directory = tmp_path / "dit"
    tiny_dit(directory)
    path = directory / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), clip_sample=True, clip_sample_range=0.5)))
    ours = load_pipeline(directory, "tiny-dit")
    assert ours.denoiser.data_clip == ClipData(0.5)
    theirs = DiTPipeline.from_pretrained(directory, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = GlideDDIM.from_pretrained(directory / "scheduler")
    expected = theirs(class_labels=[3, 917], guidance_scale=4.0, num_inference_steps=5,
                      generator=torch.Generator().manual_seed(2), output_type="pt").images
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    result = generate(ours, PipelineRequest(seeds=[0, 1], class_labels=[3, 917], steps=5, sampler="ddim",
                                            guidance=4.0, latents=latents))
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4
    unclipped = generate(replace(ours, denoiser=replace(ours.denoiser, data_clip=None)), PipelineRequest(
        seeds=[0, 1], class_labels=[3, 917], steps=5, sampler="ddim", guidance=4.0, latents=latents))
    assert (unclipped.images / 2 + 0.5 - expected).abs().max().item() > 1e-3


def test_stable_diffusion_never_clips_as_its_pipeline_rewrites_clip_sample(tmp_path):
    """StableDiffusionPipeline.__init__ sets an outdated config's clip_sample to false (and steps_offset to 1)."""
    directory = tmp_path / "sd"
    tiny_sd(directory, scheduler=DDIMScheduler(clip_sample=True, steps_offset=0))
    assert load_pipeline(directory, "tiny-sd").denoiser.data_clip is None
    assert load_pipeline(directory, "tiny-sd").schedule.config["steps_offset"] == 1
