"""Scheduler configs of pipeline checkpoints: our grids equal diffusers' set_timesteps; unmapped fields refused."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from models.diffusers_loader import UnsupportedConfig
from models.pipelines.schedule import map_schedule
from samplers.spacing import flow_mu

SD = dict(PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        skip_prk_steps=True, set_alpha_to_one=False).config, _class_name="PNDMScheduler",
          clip_sample=False)
for key in list(SD):
    if key.startswith("_use"):
        SD.pop(key)
VP = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


def _theirs(sampler, config, steps):
    scheduler = VP[sampler].from_config(config)
    scheduler.set_timesteps(steps)
    if sampler != "ddim":
        return scheduler.sigmas.double()
    acp = scheduler.alphas_cumprod.double()
    levels = ((1 - acp[scheduler.timesteps]) / acp[scheduler.timesteps]).sqrt()
    final = 0.0 if float(scheduler.final_alpha_cumprod) == 1.0 else float(((1 - acp[0]) / acp[0]).sqrt())
    return torch.cat([levels, torch.tensor([final], dtype=torch.float64)])


@pytest.mark.parametrize("fields", [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"},
                                    {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True},
                                    {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                    {"final_sigmas_type": "sigma_min"}])
@pytest.mark.parametrize("sampler", sorted(VP))
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_discrete_grids_equal_diffusers(fields, sampler, steps):
    config = dict(SD, **fields)
    if sampler == "ddim" and ("use_karras_sigmas" in fields or "use_exponential_sigmas" in fields):
        pytest.skip("DDIM has no Karras / exponential sigmas")
    ours = map_schedule(config, "m").grid(steps, sampler)
    theirs = _theirs(sampler, config, steps)
    assert ours.shape == theirs.shape
    # diffusers' table is float32: 1.3e-5 relative is its rounding
    assert torch.allclose(ours, theirs, rtol=2e-5, atol=1e-7)


def test_missing_fields_take_the_sampler_schedulers_defaults():
    """SD 1.5's file has no timestep_spacing: PNDM/DDIM read 'leading', Euler/DPM-Solver 'linspace'."""
    config = {k: v for k, v in SD.items() if k != "timestep_spacing"}
    schedule = map_schedule(config, "m")
    for sampler in VP:
        scheduler = VP[sampler].from_config(PNDMScheduler.from_config(config).config)
        assert scheduler.config.timestep_spacing == ("leading" if sampler == "ddim" else "linspace")
        assert torch.allclose(schedule.grid(10, sampler), _theirs(sampler, scheduler.config, 10), rtol=2e-5)


FLOW = [dict(shift=3.0), dict(shift=1.0), dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=1.15),
        dict(shift=3.0, shift_terminal=0.1), dict(shift=3.0, use_karras_sigmas=True),
        dict(shift=2.0, use_exponential_sigmas=True)]


@pytest.mark.parametrize("fields", FLOW)
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_times_equal_diffusers(fields, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(**fields)
    if steps == 1 and "shift_terminal" in fields:
        with pytest.raises(Exception, match="shift_terminal"):
            map_schedule(dict(scheduler.config, _class_name="FlowMatchEulerDiscreteScheduler"), "m").flow_times(1)
        return
    seq_len = 1024
    mu = flow_mu(seq_len) if fields.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(steps, mu=mu)
    ours = map_schedule(dict(scheduler.config, _class_name="FlowMatchEulerDiscreteScheduler"), "m")
    assert np.allclose(ours.flow_times(steps, seq_len), scheduler.sigmas.double().numpy(), rtol=1e-5, atol=1e-6)


def test_flux_pipeline_sigmas():
    """FLUX passes its own linspace(1, 1/n, n) to the scheduler, then the dynamic shift applies."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = flow_mu(4096 // 4)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
    ours = map_schedule(dict(scheduler.config, _class_name="FlowMatchEulerDiscreteScheduler"), "m",
                        flow_start="pipeline_linspace")
    assert np.allclose(ours.flow_times(8, 1024), scheduler.sigmas.double().numpy(), rtol=1e-5, atol=1e-6)


REFUSED_VP = [("clip_sample", True), ("thresholding", True), ("rescale_betas_zero_snr", True),
              ("use_beta_sigmas", True), ("use_lu_lambdas", True), ("timestep_type", "continuous"),
              ("interpolation_type", "log_linear"), ("timestep_spacing", "karras"), ("final_sigmas_type", "x"),
              ("prediction_type", "flow_prediction"), ("variance_type", "fixed_large"), ("sigma_min", 0.1),
              ("lambda_min_clipped", -5.1), ("use_flow_sigmas", True), ("beta_schedule", "sigmoid")]
REFUSED_FLOW = [("invert_sigmas", True), ("stochastic_sampling", True), ("use_beta_sigmas", True),
                ("time_shift_type", "cubic"), ("shift", -1.0), ("shift_terminal", 1.5)]


@pytest.mark.parametrize("field,value", REFUSED_VP)
def test_unmapped_discrete_fields_are_refused_naming_field_and_model(field, value):
    with pytest.raises(UnsupportedConfig, match=rf"model 'tiny-x'.*'{field}'"):
        map_schedule(dict(SD, **{field: value}), "tiny-x")


@pytest.mark.parametrize("field,value", REFUSED_FLOW)
def test_unmapped_flow_fields_are_refused_naming_field_and_model(field, value):
    config = dict(FlowMatchEulerDiscreteScheduler().config, _class_name="FlowMatchEulerDiscreteScheduler")
    with pytest.raises(UnsupportedConfig, match=rf"model 'tiny-x'.*'{field}'"):
        map_schedule(dict(config, **{field: value}), "tiny-x")


def test_both_karras_and_exponential_is_refused():
    with pytest.raises(UnsupportedConfig, match="use_karras_sigmas"):
        map_schedule(dict(SD, use_karras_sigmas=True, use_exponential_sigmas=True), "m")


def test_unknown_scheduler_class_is_refused():
    with pytest.raises(UnsupportedConfig, match="'_class_name'.*LCMScheduler"):
        map_schedule(dict(SD, _class_name="LCMScheduler"), "m")
