"""Stochastic samplers reach the exact marginal; seeds make samples batch-independent and repeatable."""

import math

import pytest
import torch

from samplers import SampleNoise, initial_noise, make_grid, run_sampler
from samplers.gmm import GaussianMixture, gmm_image
from samplers.processes import VE, DiscreteVP, RectifiedFlow

MEAN = torch.tensor([0.5, -1.0])
STD = 0.5
TARGET = GaussianMixture(MEAN[None], torch.tensor([STD]), torch.tensor([1.0]))
N = 6000


def _final_moments(name, process, prediction, options=None, steps=200):
    model = TARGET.denoiser(process, prediction, conditional=False)
    noise = SampleNoise(range(N), torch.float64)
    x = initial_noise(model, noise)
    sigmas = make_grid(process, steps, "uniform_lambda")
    out, _ = run_sampler(name, model, x, sigmas, noise=noise, options=options)
    return out.mean(0), torch.cov(out.T)


def _check_marginal(mean, cov):
    # Standard errors: mean STD/sqrt(N); variance about STD^2 sqrt(2/N).  Allow 4 SE plus 3% bias.
    se_mean, se_var = STD / math.sqrt(N), STD**2 * math.sqrt(2 / N)
    assert (mean - MEAN).abs().max() < 4 * se_mean + 0.01, f"mean {mean.tolist()}"
    assert (cov.diagonal() - STD**2).abs().max() < 4 * se_var + 0.03 * STD**2, f"var {cov.diagonal().tolist()}"
    assert abs(cov[0, 1]) < 4 * se_var, f"covariance {cov[0, 1]}"


@pytest.mark.parametrize("name,options", [
    ("euler_maruyama", {"eta": 1.0}), ("ddpm", None), ("dpmpp_2m_sde", None), ("ddim", {"eta": 1.0})])
@pytest.mark.parametrize("process,prediction", [(DiscreteVP.from_schedule(), "eps"),
                                                (RectifiedFlow(), "velocity")])
def test_stochastic_samplers_reach_the_marginal(name, options, process, prediction):
    _check_marginal(*_final_moments(name, process, prediction, options))


@pytest.mark.parametrize("eta", [0.0, 0.5, 2.0])
def test_any_diffusion_coefficient_keeps_the_marginal(eta):
    _check_marginal(*_final_moments("euler_maruyama", VE(), "x0", {"eta": eta}, steps=400))


def test_a_wrong_sde_does_not_pass_the_check():
    """The marginal check can fail: stopping at a noisy level gives the wrong variance."""
    model = TARGET.denoiser(VE(), "x0", conditional=False)
    noise = SampleNoise(range(N), torch.float64)
    sigmas = torch.exp(torch.linspace(math.log(80.0), math.log(0.3), 51, dtype=torch.float64))  # stops early
    out, _ = run_sampler("ddpm", model, initial_noise(model, noise), sigmas, noise=noise)
    with pytest.raises(AssertionError):
        _check_marginal(out.mean(0), torch.cov(out.T))


@pytest.mark.parametrize("name,options", [("ddpm", None), ("dpmpp_2m_sde", None), ("euler_maruyama", None),
                                          ("ddim", {"eta": 0.5}), ("dpmpp_2m", None), ("evodiff", None)])
def test_sample_is_independent_of_its_batch(name, options):
    gmm = gmm_image()
    model = gmm.denoiser(DiscreteVP.from_schedule(), "eps")
    seeds = list(range(100, 164))
    labels = torch.arange(64) % 10
    sigmas = make_grid(model.process, 8)

    def run(index):
        noise = SampleNoise([seeds[i] for i in index], torch.float32)
        x = initial_noise(model, noise)
        return run_sampler(name, model, x, sigmas, labels[index], noise=noise, options=options)[0]

    together = run(list(range(64)))
    for k in (0, 17, 63):
        alone = run([k])
        assert (alone[0] - together[k]).abs().max().item() < 1e-5
    again = run(list(range(64)))
    assert torch.equal(again, together)
