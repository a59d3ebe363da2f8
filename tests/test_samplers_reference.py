"""Our samplers against the official recursions, each written here independently from its update rule.

The loops below follow the official code's structure, in the model's own VP coordinates (x_t, alpha_t,
sigma_t, lambda = log alpha - log sigma, an eps network converted to a data prediction), not ours (VE
coordinates, the Denoiser adapter):

- DPM-Solver++(2M): DPM-Solver-v3's `DPM_Solver.sample(method="multistep", order=2)` with
  `multistep_dpm_solver_second_update` (dpmsolver++, midpoint); `lower_order_final` makes the last step
  first order at any step count.
- HB on DPM-Solver++(2M): momentum-diffusion's `dpm_solver_pytorch.py` (method "mdpm2"): the velocity
  starts at the first data prediction, every second-order step sets v = (1 - beta) v + beta D and
  updates with v; `lower_order_final` makes the last step first order (momentum-free) below 10 steps.
- EVODiff: one middle step and the final step of the official `EVODiff_edm.sample` (EDM, sigma = t),
  with per-(sample, channel) inner products by einsum.
"""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from samplers import SampleNoise, run_sampler
from samplers.calls import drive
from samplers.evodiff import EvodiffCoefficients, _final_step, _middle_step
from samplers.gmm import _mixture, gmm_image
from samplers.grids import kappas_of_times, make_grid
from samplers.momentum import hb
from samplers.ode import dpmpp_2m
from samplers.processes import VE, DiscreteVP

PROCESS = DiscreteVP.from_schedule("linear", 1000)
GMM = gmm_image()


def official_2m(net, x, times, beta=None, lower_order_final=True, below=None):
    """DPM-Solver++(2M) multistep (beta None) or HB on it, in VP coordinates; returns x at times[-1].

    `below`: lower_order_final applies only when steps < below (HB's code: 10); None = always (DPM-Solver-v3).
    """
    steps = len(times) - 1
    alpha = lambda t: float(PROCESS.alpha(t))  # noqa: E731
    sigma = lambda t: float(PROCESS.sigma(t))  # noqa: E731
    lam = lambda t: math.log(alpha(t)) - math.log(sigma(t))  # noqa: E731

    def data_prediction(x, t):
        eps = net(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        return (x - sigma(t) * eps) / alpha(t)

    def first_update(x, s, t, model_s):
        phi_1 = math.expm1(-(lam(t) - lam(s)))
        return sigma(t) / sigma(s) * x - alpha(t) * phi_1 * model_s

    def second_update(x, models, ts, t, state):
        h_0 = lam(ts[-1]) - lam(ts[-2])
        h = lam(t) - lam(ts[-1])
        d1_0 = (h / h_0) * (models[-1] - models[-2])
        phi_1 = math.expm1(-h)
        diff = models[-1] + 0.5 * d1_0
        if beta is not None:
            state["vel"] = (1 - beta) * state["vel"] + beta * diff
            diff = state["vel"]
        return sigma(t) / sigma(ts[-1]) * x - alpha(t) * phi_1 * diff

    models, ts = [data_prediction(x, times[0])], [times[0]]
    state = {"vel": models[0]}
    x = first_update(x, ts[-1], times[1], models[-1])
    ts.append(times[1])
    models.append(data_prediction(x, times[1]))
    for step in range(2, steps + 1):
        t = times[step]
        final_rule = lower_order_final and (below is None or steps < below)
        step_order = min(2, steps + 1 - step) if final_rule else 2
        if step_order == 1:
            x = first_update(x, ts[-1], t, models[-1])
        else:
            x = second_update(x, models, ts, t, state)
        models, ts = models[1:], ts[1:] + [t]
        if step < steps:
            models.append(data_prediction(x, t))
    return x


def _setup(steps, grid):
    sigmas = make_grid(PROCESS, steps, grid, final_zero=False)
    times = PROCESS.t_of_kappa(sigmas)
    x_T = SampleNoise(range(4), torch.float64).randn((1, 8, 8))
    x_bar = x_T / PROCESS.alpha(times[0])
    return GMM.network(PROCESS, "eps"), GMM.denoiser(PROCESS, "eps"), sigmas, times, x_T, x_bar


@pytest.mark.parametrize("grid", ["uniform_lambda", "uniform_t"])
@pytest.mark.parametrize("steps", [5, 8, 10, 12])
@pytest.mark.parametrize("beta", [0.8, 0.5])
def test_hb_follows_the_official_recursion(grid, steps, beta):
    net, model, sigmas, times, x_T, x_bar = _setup(steps, grid)
    end = float(PROCESS.alpha(times[-1]))
    reference = official_2m(net, x_T, times, beta=beta, lower_order_final=True, below=10)
    ours = hb(model, x_bar, sigmas, beta=beta, final_step="reference") * end
    assert (ours - reference).abs().max().item() <= 1e-10
    # final_step "ours" is the official code without lower_order_final (the same from 10 steps on)
    no_lof = official_2m(net, x_T, times, beta=beta, lower_order_final=False)
    assert (hb(model, x_bar, sigmas, beta=beta) * end - no_lof).abs().max().item() <= 1e-10


def test_hb_velocity_starts_at_the_first_data_prediction():
    """The first second-order step uses (1 - beta) D_0 + beta d, so two steps are 0.2 D_0 + 0.8 d."""
    _, model, sigmas, _, _, x = _setup(3, "uniform_lambda")
    s0, s1, s2 = (float(v) for v in sigmas[:3])
    d0 = model(x, s0)
    x1 = (s1 / s0) * x + (1 - s1 / s0) * d0
    d1 = model(x1, s1)
    d = d1 + (d1 - d0) * (math.log(s1 / s2) / (2 * math.log(s0 / s1)))
    expected = (s2 / s1) * x1 + (1 - s2 / s1) * (0.2 * d0 + 0.8 * d)
    ours = hb(model, x, sigmas[:3], beta=0.8)
    assert (ours - expected).abs().max().item() <= 1e-12


@pytest.mark.parametrize("grid", ["uniform_lambda", "uniform_t"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_reference_final_step_is_the_official_recursion(grid, steps):
    net, model, sigmas, times, x_T, x_bar = _setup(steps, grid)
    end = float(PROCESS.alpha(times[-1]))
    reference = official_2m(net, x_T, times, lower_order_final=True)
    ours = dpmpp_2m(model, x_bar, sigmas, final_step="reference") * end
    assert (ours - reference).abs().max().item() <= 1e-10
    no_lof = official_2m(net, x_T, times, lower_order_final=False)
    assert (dpmpp_2m(model, x_bar, sigmas) * end - no_lof).abs().max().item() <= 1e-10


@pytest.mark.parametrize("steps", [5, 12])
def test_final_step_options_agree_on_a_grid_ending_at_zero(steps):
    """Both conventions take a first-order last step to sigma = 0: the option matters only off zero."""
    model = GMM.denoiser(PROCESS, "eps")
    x = SampleNoise(range(4), torch.float64).randn((1, 8, 8)) * 150
    sigmas = make_grid(PROCESS, steps)
    assert torch.equal(dpmpp_2m(model, x, sigmas, final_step="reference"), dpmpp_2m(model, x, sigmas))
    assert torch.equal(hb(model, x, sigmas, final_step="reference"), hb(model, x, sigmas))


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_3m_matches_diffusers_solver_order_3(steps):
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3)
    net = GMM.network(PROCESS, "eps")
    scheduler.set_timesteps(steps)
    x_T = SampleNoise(range(4), torch.float64).randn((1, 8, 8))
    x = x_T.clone().float()
    for t in scheduler.timesteps:
        eps = net(x.double(), torch.full((x.shape[0],), float(t), dtype=torch.float64)).float()
        x = scheduler.step(eps, t, x).prev_sample
    timesteps = scheduler.timesteps.double()
    sigmas = torch.cat([kappas_of_times(PROCESS, timesteps), torch.zeros(1, dtype=torch.float64)])
    model = GMM.denoiser(PROCESS, "eps")
    out, nfe = run_sampler("dpmpp_3m", model, x_T / PROCESS.alpha(timesteps[0]), sigmas)
    assert nfe == steps
    assert (out - x.double()).abs().max().item() <= 1e-4
    exact, _ = run_sampler("dpmpp_3m_exact", model, x_T / PROCESS.alpha(timesteps[0]), sigmas)
    assert (exact - x.double()).abs().max().item() > 1e-4  # the corrected coefficient is another method


# --- EVODiff: one step of the official update, on a fixed input --------------------------------------

def _dot(a, b):
    return torch.einsum("bchw,bchw->bc", a, b).view(a.size(0), -1, 1, 1)


def _pc(a, b):
    return torch.clamp(_dot(a, b) / _dot(b, b), min=-2, max=2)


def official_evodiff_middle_step(model, x, m0, m1, k_prev1, k_prev0, k_t, t_0, t_T, steps):
    """One order-2 step of EVODiff_edm.sample (EDM: alpha = 1, sigma = kappa = t); returns (x, m_t)."""
    sigma_rat0, sigma_ra01 = k_t / k_prev0, k_prev0 / k_prev1
    h = 1 / k_t - 1 / k_prev0
    x_euler = sigma_rat0 * x + k_t * h * m0
    r_logh = math.log(k_prev1 / k_prev0) / math.log(k_prev0 / k_t)
    weight_t = 0.5 * (1 - ((k_t + t_0) / (t_T + t_0)) ** 2)
    balance_baser = math.sqrt(sigma_rat0 / sigma_ra01)
    r1_balance = (1 - weight_t) * balance_baser + weight_t * torch.clamp(_dot(m0, m1) / _dot(m1, m1), -2, 2)
    d1_0 = m0 - r1_balance * m1
    r_i = torch.clamp(torch.sigmoid(0.25 * r1_balance.abs()) * r_logh, min=0.25 * r_logh, max=1.5 * r_logh)
    x = x_euler + 0.5 * k_t * h / r_i * d1_0
    m_t = model(x, torch.full((x.shape[0],), k_t, dtype=torch.float64))
    r2_balance = (1 - weight_t) * balance_baser + weight_t * torch.clamp(_dot(m_t, m0) / _dot(m0, m0), -2, 2)
    d2_0 = m_t - r2_balance * m0
    b_pre, b_next = 1 / r_logh / h * d1_0, r_logh / h * d2_0
    eta = 0.5 * torch.sigmoid(torch.abs(0.5 * _pc(b_next + b_pre, b_next - b_pre)))
    b_theta = -eta / r_logh * d1_0 + r_logh * (1 - eta) * d2_0
    p_1 = x - x_euler - 0.5 * k_t * h / r_i * b_theta
    zeta_shift = torch.abs(_pc(p_1, d1_0) / (h * k_t)) - 0.5
    if steps > 20:
        d10 = (m0 - m1) / h
        zeta = torch.sigmoid(-zeta_shift * torch.sigmoid(_pc(m0, d10) * (2 - sigma_rat0**2)))
    else:
        zeta = torch.sigmoid(zeta_shift)
    return x_euler + 0.5 * k_t * h / zeta * b_theta, m_t


def official_evodiff_final_step(x, m_s, m_prev, k_s, k_t):
    h = 1 / k_t - 1 / k_s
    ratio = k_t / k_s
    x_t = ratio * x + k_t * h * m_s
    r_f = 1 - 0.5 * math.sqrt(ratio) if ratio < 0.5 else 1 - 0.5 * math.sqrt(ratio - 0.5)
    return (1 - math.sqrt(k_t * k_s)) * x_t + 0.5 * k_t * h * (m_s - r_f * m_prev)


@pytest.fixture(scope="module")
def evodiff_input():
    """A fixed (2, 3, 4, 4) state on an EDM Gaussian mixture: x at kappa_s after a DDIM step from
    kappa_prev, with the two stored data predictions."""
    gmm = _mixture((3, 4, 4), 4, 2, 0.8, (0.1, 0.3))
    process = VE()
    model = gmm.denoiser(process, "x0", conditional=False)
    k_prev, k_s = 2.5, 1.1
    x_prev = SampleNoise(range(2), torch.float64).randn((3, 4, 4)) * k_prev
    m1 = model(x_prev, k_prev)
    x = (k_s / k_prev) * x_prev + (1 - k_s / k_prev) * m1
    return model, process, x, model(x, k_s), m1, k_prev, k_s


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("k_t", [0.6, 0.3])
def test_evodiff_step_is_the_official_update(evodiff_input, steps, k_t):
    model, process, x, m0, m1, k_prev, k_s = evodiff_input
    t_0, t_T = process.t_min, process.t_max
    expected, expected_m = official_evodiff_middle_step(model, x, m0, m1, k_prev, k_s, k_t, t_0, t_T, steps)
    ours, ours_m = drive(_middle_step(x, m0, m1, k_prev, k_s, k_t, t_0, t_T, steps, model, None,
                                      EvodiffCoefficients()))
    assert torch.equal(ours_m, expected_m)
    assert (ours - expected).abs().max().item() <= 1e-12
    # the adaptive coefficients matter: the step is not DPM-Solver++(2M)'s
    assert (ours - drive(_middle_step(x, m0, m1, k_prev, k_s, k_t, t_0, t_T, steps, model, None,
                                      EvodiffCoefficients(adaptive=False)))[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("k_t", [0.6, 0.3])
def test_evodiff_final_step_is_the_official_update(evodiff_input, k_t):
    _, _, x, m0, m1, k_prev, k_s = evodiff_input
    r_logh = math.log(k_prev / k_s) / math.log(k_s / k_t)
    ours = _final_step(x, m0, m1, k_s, k_t, EvodiffCoefficients(), r_logh)
    assert (ours - official_evodiff_final_step(x, m0, m1, k_s, k_t)).abs().max().item() <= 1e-12
