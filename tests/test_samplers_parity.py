"""Parity with diffusers' schedulers on the same discrete-VP eps model and the same timesteps."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from samplers import SampleNoise, run_sampler
from samplers.evodiff import NEUTRAL, evodiff
from samplers.gmm import gmm_image
from samplers.grids import kappas_of_times, make_grid
from samplers.momentum import ghvb, hb, plms, plms_hb
from samplers.ode import dpmpp_2m
from samplers.processes import DiscreteVP, RectifiedFlow

PROCESS = DiscreteVP.from_schedule("linear", 1000)
GMM = gmm_image()


def _diffusers_run(scheduler, steps, x_T):
    net = GMM.network(PROCESS, "eps")
    scheduler.set_timesteps(steps)
    x = x_T.clone().float()
    for t in scheduler.timesteps:
        eps = net(x.double(), torch.full((x.shape[0],), float(t), dtype=torch.float64)).float()
        x = scheduler.step(eps, t, x).prev_sample
    return x.double(), scheduler.timesteps


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2),
    "unipc": lambda: UniPCMultistepScheduler(solver_order=2, solver_type="bh2"),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_matches_diffusers(name, steps):
    x_T = SampleNoise(range(4), torch.float64).randn((1, 8, 8))
    expected, timesteps = _diffusers_run(SCHEDULERS[name](), steps, x_T)
    sigmas = torch.cat([kappas_of_times(PROCESS, timesteps.double()), torch.zeros(1, dtype=torch.float64)])
    model = GMM.denoiser(PROCESS, "eps")
    out, nfe = run_sampler(name, model, x_T / PROCESS.alpha(timesteps[0].double()), sigmas)
    assert nfe == steps
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def start():
    model = GMM.denoiser(PROCESS, "eps")
    return model, SampleNoise(range(5), torch.float64).randn((1, 8, 8)) * 150


@pytest.mark.parametrize("final_zero", [True, False])
def test_momentum_with_beta_one_is_the_base_method(start, final_zero):
    model, x = start
    sigmas = make_grid(PROCESS, 12, "uniform_t", final_zero=final_zero)
    assert torch.equal(hb(model, x, sigmas, beta=1.0), dpmpp_2m(model, x, sigmas))
    for order in (1, 2, 3, 4):
        base = plms(model, x, sigmas, order=order)
        assert torch.allclose(plms_hb(model, x, sigmas, order=order, beta=1.0), base, atol=1e-12, rtol=0)
        assert torch.allclose(ghvb(model, x, sigmas, order=order, beta=1.0), base, atol=1e-12, rtol=0)


def test_momentum_changes_the_result(start):
    model, x = start
    sigmas = make_grid(PROCESS, 8)
    assert not torch.allclose(hb(model, x, sigmas, beta=0.8), dpmpp_2m(model, x, sigmas))
    assert not torch.allclose(ghvb(model, x, sigmas, order=2, beta=0.5), plms(model, x, sigmas, order=2))


@pytest.mark.parametrize("process", [PROCESS, RectifiedFlow()])
@pytest.mark.parametrize("final_zero", [True, False])
def test_evodiff_neutralised_is_dpmpp_2m(start, process, final_zero):
    model = GMM.denoiser(process, "velocity" if isinstance(process, RectifiedFlow) else "eps")
    x = start[1]
    sigmas = make_grid(process, 10, "uniform_lambda", final_zero=final_zero)
    neutral = evodiff(model, x, sigmas, coefficients=NEUTRAL)
    assert torch.allclose(neutral, dpmpp_2m(model, x, sigmas), atol=1e-12, rtol=0)
    assert not torch.allclose(evodiff(model, x, sigmas), neutral, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 5, 10])
def test_evodiff_spends_one_nfe_per_step(start, steps):
    model, x = start
    _, nfe = run_sampler("evodiff", model, x, make_grid(PROCESS, steps))
    assert nfe == steps
