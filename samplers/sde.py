"""Stochastic samplers for every model kind (diffusion and flow alike, in VE coordinates).

The reverse-time family that keeps the marginals of x = x0 + sigma eps: with tau = -sigma running forward,
    dx = (sigma + g^2 / 2) score(x, sigma) dtau + g dW_tau,   score = (D(x, sigma) - x) / sigma^2,
for any diffusion coefficient g (Song et al. 2021, eq. 6 and the probability-flow ODE, Karras et al. 2022,
eq. 6 generalised).  g = 0 is the probability-flow ODE; g^2 = 2 sigma is the reverse of the forward SDE.
"""

from __future__ import annotations

import math

from .calls import evaluate
from .errors import InvalidRequest
from .hooks import report
from .ode import ancestral_step
from .registry import Option, register


def _need_noise(noise, name):
    if noise is None:
        raise InvalidRequest(f"sampler: {name!r} is stochastic and needs per-sample noise (seeds)")


def reverse_sde_step(x, denoised, sigma: float, sigma_next: float, g2: float, noise):
    """One Euler-Maruyama step of the family above from sigma to sigma_next > 0, with g^2 = `g2`."""
    dtau = sigma - sigma_next
    score = (denoised - x) / sigma**2
    x = x + (sigma + g2 / 2) * score * dtau
    return x + math.sqrt(g2 * dtau) * noise.randn_like(x) if g2 > 0 else x


@register("euler_maruyama", order=1, stochastic=True,
          step_noise=lambda s, t, o: math.sqrt(2 * o.get("eta", 1.0) * s * (s - t)) if t > 0 else 0.0,
          options={"eta": Option(float, 1.0, 0.0, 10.0,
                                 help="g^2 = 2 eta sigma; 0 = probability-flow ODE, 1 = reverse SDE")},
          when_to_use="Euler-Maruyama on the marginal-preserving reverse SDE; the stochastic baseline "
          "search uses; needs many steps.")
def euler_maruyama(model, x, sigmas, cond=None, *, noise=None, hook=None, eta: float = 1.0):
    """Euler-Maruyama (Kloeden & Platen) on the reverse SDE family with g^2 = 2 eta sigma; a final step
    to sigma = 0 returns the data prediction."""
    _need_noise(noise, "euler_maruyama")
    steps = len(sigmas) - 1
    for i in range(steps):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield evaluate(model, x, s, cond)
        x = denoised if t == 0 else reverse_sde_step(x, denoised, s, t, 2 * eta * s, noise)
        report(hook, i, steps, s, t, x, denoised)
    return x


def ddpm_step(x, denoised, sigma: float, sigma_next: float, noise):
    """One draw from q(x_next | x, x0 = denoised) (Ho et al. 2020, Algorithm 2) in VE coordinates: posterior
    mean weight sigma_next^2 / sigma^2 on x, variance sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2."""
    _, sigma_up = ancestral_step(sigma, sigma_next, 1.0)
    x = denoised + (sigma_next / sigma) ** 2 * (x - denoised)
    if sigma_up > 0:
        x = x + sigma_up * noise.randn_like(x)
    return x


@register("ddpm", order=1, stochastic=True, step_noise=lambda s, t, o: ancestral_step(s, t, 1.0)[1],
          when_to_use="DDPM ancestral sampling (exact posterior steps given D); equals DDIM with eta = 1.")
def ddpm(model, x, sigmas, cond=None, *, noise=None, hook=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): draw x_s from q(x_s | x_t, x0 = D(x_t))."""
    _need_noise(noise, "ddpm")
    steps = len(sigmas) - 1
    for i in range(steps):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield evaluate(model, x, s, cond)
        x = ddpm_step(x, denoised, s, t, noise)
        report(hook, i, steps, s, t, x, denoised)
    return x


@register("dpmpp_2m_sde", order=2, stochastic=True,
          step_noise=lambda s, t, o: t * math.sqrt(-math.expm1(-2 * math.log(s / t))) if t > 0 else 0.0,
          when_to_use="SDE-DPM-Solver++(2M): stochastic second order, good at 20-50 steps.")
def dpmpp_2m_sde(model, x, sigmas, cond=None, *, noise=None, hook=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, DPM-Solver++ Sec. 5; diffusers' midpoint form), data
    prediction: x_t = (s_t/s_s) e^{-h} x + (1 - e^{-2h})(D0 + D1/2) + s_t sqrt(1 - e^{-2h}) z."""
    _need_noise(noise, "dpmpp_2m_sde")
    steps = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(steps):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield evaluate(model, x, s, cond)
        if t == 0:
            x = denoised
        else:
            h = math.log(s / t)
            d = denoised if old_denoised is None else denoised + (denoised - old_denoised) * h / (2 * h_last)
            x = (t / s) * math.exp(-h) * x - math.expm1(-2 * h) * d
            x = x + t * math.sqrt(-math.expm1(-2 * h)) * noise.randn_like(x)
            h_last = h
        old_denoised = denoised
        report(hook, i, steps, s, t, x, denoised)
    return x
