"""Empirical convergence order of the deterministic solvers against the exact probability-flow ODE."""

import math

import pytest
import torch

from samplers import SampleNoise, run_sampler
from samplers.gmm import _mixture
from samplers.processes import VE

SIGMA_MAX, SIGMA_END = 150.0, 0.05


@pytest.fixture(scope="module")
def problem():
    gmm = _mixture((1, 8, 8), 3, 1, 0.5, (0.4, 0.6))  # a smooth 3-component mixture in 64-D
    model = gmm.denoiser(VE(t_max=200.0), "x0", conditional=False)
    x = SampleNoise(range(6), torch.float64).randn((1, 8, 8)) * SIGMA_MAX
    return model, x, gmm.exact_ode(x, SIGMA_MAX, SIGMA_END)


def _error(model, x, ref, name, steps):
    sigmas = torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_END), steps + 1, dtype=torch.float64))
    out, _ = run_sampler(name, model, x, sigmas)
    return (out - ref).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("name,order,steps", [
    ("euler", 1, (64, 128)), ("heun", 2, (32, 64)), ("dpmpp_2m", 2, (64, 128)),
    ("dpmpp_3m", 2, (64, 128)), ("dpmpp_3m_exact", 3, (64, 128)), ("unipc", 3, (32, 64)),
])
def test_convergence_order(problem, name, order, steps):
    model, x, ref = problem
    coarse, fine = (_error(model, x, ref, name, n) for n in steps)
    slope = math.log(coarse / fine) / math.log(steps[1] / steps[0])
    assert abs(slope - order) < 0.5, f"{name}: measured order {slope:.2f}, expected about {order}"


def test_third_order_needs_the_full_d2_coefficient(problem):
    """dpmpp_3m_exact is markedly more accurate than dpmpp_2m and than the reference dpmpp_3m once in the
    asymptotic regime."""
    model, x, ref = problem
    exact = _error(model, x, ref, "dpmpp_3m_exact", 128)
    assert exact < 0.2 * _error(model, x, ref, "dpmpp_2m", 128)
    assert exact < 0.2 * _error(model, x, ref, "dpmpp_3m", 128)
