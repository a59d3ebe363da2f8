"""Exact references for the weighted and converted SDEs of search/ on small Gaussian mixtures.

Monte-Carlo error is measured, not guessed: each test runs G independent SMC populations (one search per
seed) and compares the mean of their estimates with the exact value in units of the standard error
across populations.  Every test also runs a variant that must fail the same check.
"""

import math

import pytest
import torch

from samplers.gmm import GaussianMixture, gmm_2d
from samplers.noise import SampleNoise
from samplers.processes import DiscreteVP, RectifiedFlow
from search.budget import Budget, CountedModel
from search.core import Streams
from search.fkc import fkc_particles, systematic_resample
from search.flow_sde import (
    INTERPOLANTS,
    converted_sde,
    kappa,
    largest_time,
    score_from_velocity,
    time_grid,
    tweedie,
    velocity,
)

F64 = torch.float64


def _z(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|mean - exact| / standard error, per statistic, over independent populations (rows)."""
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    return (estimates.mean(0) - exact).abs() / se


def _region(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """A fixed partition of the plane: the component with the largest w_k N_k(x) (noise-free)."""
    d = torch.cdist(x.double(), mixture.means.double()) ** 2
    s2 = mixture.stds.double()[None] ** 2
    return (-0.5 * d / s2 - torch.log(s2) + torch.log(mixture.weights.double()[None])).argmax(1)


def _stats(mixture, x, w):
    """Region masses (K), mean (2) and covariance (3) of the weighted sample (x, w)."""
    a = _region(mixture, x)
    masses = torch.stack([(w * (a == k)).sum() for k in range(mixture.num_classes)])
    mean = (w[:, None] * x).sum(0)
    cov = ((x - mean).T * w) @ (x - mean)
    return torch.cat([masses, mean, cov.reshape(-1)[[0, 1, 3]]])


def _tempered_reference(mixture, sigma, beta):
    """The same statistics of p_sigma^beta by quadrature on a fine grid (exact to ~1e-4 here)."""
    lin = torch.linspace(-2.5, 2.5, 801, dtype=F64)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    return _stats(mixture, pts, torch.softmax(beta * mixture.log_density(pts, sigma), 0))


@pytest.mark.parametrize("reweight", [True, False])
def test_fkc_annealing_reproduces_the_tempered_mixture(reweight):
    """FKC at beta = 2 (target-score SDE + weights) matches the tempered mixture's region masses and
    moments within Monte-Carlo error; the same SDE without the weights does not."""
    mixture = gmm_2d()
    model = mixture.denoiser(DiscreteVP.from_schedule(), "eps", conditional=False)
    g, k = 10, 250
    x, log_w, resamplings = fkc_particles(CountedModel(model, Budget(10**9, g)), steps=100, cond=None,
                                          streams=Streams(range(g)), particles=k, target="anneal", beta=2.0,
                                          reweight=reweight)
    exact = _tempered_reference(mixture, model.sigma_min, 2.0)
    x = x.double().reshape(g, k, 2)
    est = torch.stack([_stats(mixture, x[i], torch.softmax(log_w[i], 0)) for i in range(g)])
    z = _z(est, exact)
    if reweight:
        assert resamplings > 0
        assert z.max() < 5.0, z
    else:
        assert z.max() > 10.0, z  # the plain SDE is far outside Monte-Carlo error
        assert (est.mean(0)[:8] - exact[:8]).abs().max() > 0.05


@pytest.mark.parametrize("reweight", [True, False])
def test_fkc_product_of_two_gaussian_experts_is_the_analytic_product(reweight):
    """(q1 q2) of N(mu1, v1) and N(mu2, v2) is N(mu, v) with 1/v = 1/v1 + 1/v2, mu = v (mu1/v1 + mu2/v2)."""
    mu = torch.tensor([[-0.5, 0.0], [0.5, 0.3]], dtype=F64)
    sd = torch.tensor([0.3, 0.4], dtype=F64)
    mixture = GaussianMixture(mu, sd, torch.tensor([0.5, 0.5], dtype=F64))
    model = mixture.denoiser(DiscreteVP.from_schedule(), "eps", conditional=True)
    v = sd**2 + model.sigma_min**2
    var = 1 / (1 / v).sum()
    exact = torch.cat([var * (mu / v[:, None]).sum(0), var.reshape(1)])
    g, k = 10, 150
    labels = torch.zeros(g, dtype=torch.int64)
    x, log_w, _ = fkc_particles(CountedModel(model, Budget(10**9, g)), steps=100, cond=labels, cond_b=labels + 1,
                                streams=Streams(range(g)), particles=k, target="product", beta=1.0, reweight=reweight)
    x, w = x.double().reshape(g, k, 2), torch.softmax(log_w, 1)
    mean = (w[..., None] * x).sum(1)
    per_dim_var = (w[..., None] * (x - mean[:, None]) ** 2).sum(1).mean(1)
    z = _z(torch.cat([mean, per_dim_var[:, None]], 1), exact)
    if reweight:
        assert z.max() < 5.0, z
    else:
        assert z.max() > 10.0, z


def test_systematic_resampling_counts():
    """Each index appears floor(K w) or ceil(K w) times (the defining property of systematic resampling)."""
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.05, 0.05, 0.6, 0.3]], dtype=F64)
    for u in (0.0, 0.3, 0.99):
        idx = systematic_resample(w.log(), torch.full((2,), u, dtype=F64))
        for row in range(2):
            counts = torch.bincount(idx[row], minlength=4).double()
            assert ((counts - 4 * w[row]).abs() < 1).all()


def test_velocity_conversion_matches_the_posterior_velocity_of_the_vp_path():
    """Eq. 11 from the linear-path velocity equals alpha_dot x0_hat + sigma_dot eps_hat on the VP path;
    Eq. 8 and the interpolant's Tweedie recover -eps/sigma and x0_hat."""
    mixture = gmm_2d()
    vp = INTERPOLANTS["vp"]
    for process, prediction in [(RectifiedFlow(), "velocity"), (DiscreteVP.from_schedule(), "eps")]:
        model = mixture.denoiser(process, prediction, conditional=False)
        x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        for s in (0.9, 0.5, 0.2):
            st = torch.tensor(s, dtype=F64)
            a, sg, da, dsg = vp.coefficients(st)
            x0 = model(x / a, sg / a)
            eps = (x - a * x0) / sg
            u = velocity(model, vp, x, st)
            torch.testing.assert_close(u, da * x0 + dsg * eps, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(tweedie(vp, x, u, st), x0, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(score_from_velocity(vp, x, u, st), -eps / sg, rtol=1e-6, atol=1e-6)


def _mean_responsibility(mixture, x_ve, sigma):
    """E[r_k(x)] over samples; under the exact marginal at `sigma` it equals the weight w_k."""
    log_r, _ = mixture._log_resp(x_ve.double(), torch.full((x_ve.shape[0],), float(sigma), dtype=F64), None)
    return log_r.exp().mean(0)


def _marginal_stats(mixture, x_ve, sigma):
    return torch.cat([_mean_responsibility(mixture, x_ve, sigma), x_ve.double().mean(0),
                      x_ve.double().pow(2).mean(0)])


def _exact_marginal_stats(mixture, sigma):
    w, mu, var = mixture.weights.double(), mixture.means.double(), mixture.stds.double() ** 2 + sigma**2
    return torch.cat([w, (w[:, None] * mu).sum(0), (w[:, None] * (mu**2 + var[:, None])).sum(0)])


@pytest.mark.parametrize("interpolant,diffusion", [("linear", "square"), ("vp", "square"), ("linear", "broken")])
def test_converted_sde_keeps_the_ode_marginals(interpolant, diffusion):
    """RBF's converted SDE (g = 3 s^2, no search) keeps the probability-flow marginals on the GMM at an
    intermediate time and at the end, on the linear path and after conversion to VP; dropping the
    -g^2/2 score correction from the drift ("broken") does not."""
    mixture = gmm_2d()
    model = mixture.denoiser(RectifiedFlow(), "velocity", conditional=False)
    interp = INTERPOLANTS[interpolant]
    times = time_grid("uniform", 120, largest_time(interp, model.sigma_max))
    n, groups = 1000, 5
    noise = SampleNoise(range(n), F64)
    xs = noise.randn((2,))
    g_norm = 3.0
    for start, stop in ((0, 60), (60, 114)):  # to s = 0.5 s_max, then to 0.05 s_max
        if diffusion == "broken":
            # Same noise, ODE drift only: adds variance that nothing removes.
            xs = _broken_sde(model, interp, xs, times[start: stop + 1], noise, g_norm)
        else:
            xs, _ = converted_sde(model, xs, times[start: stop + 1], interp, "square", g_norm, None, noise)
        a, sg, _, _ = interp.coefficients(times[stop])
        sigma = float(sg / a)
        est = torch.stack([_marginal_stats(mixture, c / a, sigma) for c in xs.chunk(groups)])
        z = _z(est, _exact_marginal_stats(mixture, sigma))
        if diffusion == "broken":
            if stop == 114:
                assert z.max() > 10.0, z
        else:
            assert z.max() < 5.0, (stop, z)


def _broken_sde(model, interp, x, times, noise, g_norm):
    from search.flow_sde import diffusion_coefficient
    for i in range(len(times) - 1):
        u = velocity(model, interp, x, times[i])
        ds = times[i] - times[i + 1]
        g = diffusion_coefficient("square", g_norm, times[i])
        x = x - ds * u + g * ds.sqrt() * noise.randn_like(x)
    return x


def test_vp_and_linear_grids_reach_the_same_noise_levels():
    """The conversion matches SNRs: VP time s and linear time t_s = sigma/(alpha + sigma) share kappa."""
    vp, lin = INTERPOLANTS["vp"], INTERPOLANTS["linear"]
    for s in (0.1, 0.5, 0.9):
        a, sg, _, _ = vp.coefficients(torch.tensor(s, dtype=F64))
        torch.testing.assert_close(kappa(lin, sg / (a + sg)), kappa(vp, s))
