"""Deterministic baselines users already run: Euler, Heun, DDIM, DPM-Solver++(2M/3M) and UniPC.

All work in VE coordinates (x = x_t / alpha, sigma = sigma_t / alpha) on a decreasing schedule that may
end at 0; lambda = -log(sigma).  A step to sigma = 0 returns the data prediction.
"""

from __future__ import annotations

import math

import torch

from .calls import evaluate
from .errors import InvalidRequest
from .hooks import report
from .registry import Option, register


def _lam(sigma) -> float:
    return -math.log(float(sigma))


@register("euler", order=1, when_to_use="Simplest first-order ODE solver; equals DDIM and, on flow models, "
          "flow-matching Euler.")
def euler(model, x, sigmas, cond=None, *, noise=None, hook=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al.
    2022, Algorithm 1 without churn)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield evaluate(model, x, sigmas[i], cond)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        report(hook, i, steps, sigmas[i], sigmas[i + 1], x, denoised)
    return x


@register("heun", nfe_per_step=2, order=2, extra_nfe=-1, when_to_use="EDM's second-order sampler; 2 NFE "
          "per step (the step to sigma = 0 is Euler).")
def heun(model, x, sigmas, cond=None, *, noise=None, hook=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler on a final step to sigma = 0."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield evaluate(model, x, sigmas[i], cond)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        x_next = x + d * dt
        if sigmas[i + 1] > 0:
            d_next = (x_next - (yield evaluate(model, x_next, sigmas[i + 1], cond))) / sigmas[i + 1]
            x_next = x + 0.5 * (d + d_next) * dt
        x = x_next
        report(hook, i, steps, sigmas[i], sigmas[i + 1], x, denoised)
    return x


def ancestral_step(sigma, sigma_next, eta: float) -> tuple[float, float]:
    """Split a step into a deterministic part to sigma_down and fresh noise of std sigma_up.

    eta = 1 gives the DDPM posterior variance sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


@register("ddim", order=1, stochastic=False, step_noise=lambda s, t, o: ancestral_step(s, t, o.get("eta", 0.0))[1],
          options={"eta": Option(float, 0.0, 0.0, 1.0, help="0 = deterministic DDIM, 1 = DDPM variance")},
          when_to_use="DDIM; eta > 0 adds noise (needs seeds), eta = 1 is DDPM ancestral sampling.")
def ddim(model, x, sigmas, cond=None, *, noise=None, hook=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) in VE coordinates, with sigma_eta = eta x the DDPM posterior std."""
    if eta > 0 and noise is None:
        raise InvalidRequest("option 'eta': eta > 0 needs per-sample noise (seeds)")
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield evaluate(model, x, sigmas[i], cond)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = denoised + (sigma_down / sigmas[i]) * (x - denoised)
        if sigma_up > 0:
            x = x + sigma_up * noise.randn_like(x)
        report(hook, i, steps, sigmas[i], sigmas[i + 1], x, denoised)
    return x


def dpmpp_first_order(x, denoised, sigma, sigma_next):
    """DPM-Solver++(1) = DDIM: x_t = (sigma_t / sigma_s) x + (1 - e^{-h}) D."""
    if sigma_next == 0:
        return denoised
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised


def midpoint_direction(denoised, old_denoised, h: float, h_last: float):
    """DPM-Solver++(2M)'s D = m0 + (m0 - m1) / (2 r) with r = h_last / h (midpoint form)."""
    return denoised + (denoised - old_denoised) * (h / (2 * h_last))


FINAL_STEP = Option(str, "ours", choices=("ours", "reference"),
                    help="last step: 'ours' = first order only when it goes to sigma = 0; 'reference' = always "
                         "first order (lower_order_final of the official DPM-Solver / DPM-Solver-v3 code)")


@register("dpmpp_2m", order=2, options={"final_step": FINAL_STEP},
          when_to_use="DPM-Solver++(2M): the default fast sampler, 10-20 steps.")
def dpmpp_2m(model, x, sigmas, cond=None, *, noise=None, hook=None, final_step: str = "ours"):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, midpoint form; first order on the
    first step and on a final step to sigma = 0 (diffusers' lower_order_final), or with
    final_step = "reference" on every last step (the official code's lower_order_final)."""
    steps = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(steps):
        denoised = yield evaluate(model, x, sigmas[i], cond)
        last_first_order = final_step == "reference" and i == steps - 1
        if old_denoised is None or sigmas[i + 1] == 0 or last_first_order:
            x_next = dpmpp_first_order(x, denoised, sigmas[i], sigmas[i + 1])
        else:
            d = midpoint_direction(denoised, old_denoised, math.log(sigmas[i] / sigmas[i + 1]), h_last)
            x_next = dpmpp_first_order(x, d, sigmas[i], sigmas[i + 1])
        if sigmas[i + 1] > 0:
            h_last = math.log(sigmas[i] / sigmas[i + 1])
        x, old_denoised = x_next, denoised
        report(hook, i, steps, sigmas[i], sigmas[i + 1], x, denoised)
    return x


def _dpmpp_3m(model, x, sigmas, cond, hook, d2_scale: float):
    """The shared DPM-Solver++(3M) step machine; the D2 term is -d2_scale ((e^{-h} - 1 + h) / h^2 - 1/2) D2.

    d2_scale = 1 is diffusers' and k-diffusion's coefficient, 2 the one the Taylor expansion asks for
    (see dpmpp_3m_exact).  Orders warm up 1, 2, 3 and, on a grid ending at 0, come down as diffusers'
    lower_order_final does (first order to sigma = 0, second order before it below 15 steps)."""
    steps = len(sigmas) - 1
    history: list[tuple[torch.Tensor, float]] = []  # (denoised, lambda) newest last
    for i in range(steps):
        denoised = yield evaluate(model, x, sigmas[i], cond)
        history = (history + [(denoised, _lam(sigmas[i]))])[-3:]
        order = min(3, len(history))
        if sigmas[-1] == 0 and i == steps - 1:
            order = 1  # diffusers' lower_order_final: a first-order step to sigma = 0
        elif sigmas[-1] == 0 and i == steps - 2 and steps < 15:
            order = min(order, 2)
        s, t = sigmas[i], sigmas[i + 1]
        if t == 0 or order == 1:
            x = dpmpp_first_order(x, denoised, s, t)
        else:
            h = _lam(t) - _lam(s)
            phi1 = torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # e^{-h} - 1
            m0, l0 = history[-1]
            m1, l1 = history[-2]
            r0 = (l0 - l1) / h
            d1_0 = (m0 - m1) / r0
            base = (t / s) * x - phi1 * m0
            if order == 2:
                x = base - 0.5 * phi1 * d1_0
            else:
                m2, l2 = history[-3]
                r1 = (l1 - l2) / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = base + (phi1 / h + 1) * d1 - d2_scale * ((phi1 + h) / h**2 - 0.5) * d2
        report(hook, i, steps, s, t, x, denoised)
    return x


@register("dpmpp_3m", order=2, when_to_use="DPM-Solver++(3M) exactly as diffusers and k-diffusion implement it "
          "(measured second order; dpmpp_3m_exact is the third-order method).")
def dpmpp_3m(model, x, sigmas, cond=None, *, noise=None, hook=None):
    """DPM-Solver++(3M) (Lu et al. 2022, multistep third order) with the D2 coefficient of diffusers'
    DPMSolverMultistepScheduler(solver_order=3), k-diffusion and the official DPM-Solver code,
    (e^{-h} - 1 + h) / h^2 - 1/2; it equals diffusers' scheduler on the same timesteps and converges at
    order 2 only (docs/samplers.md)."""
    return (yield from _dpmpp_3m(model, x, sigmas, cond, hook, d2_scale=1.0))


@register("dpmpp_3m_exact", order=3, when_to_use="DPM-Solver++(3M) with the corrected D2 coefficient: third "
          "order, for 15+ steps without guidance.")
def dpmpp_3m_exact(model, x, sigmas, cond=None, *, noise=None, hook=None):
    """DPM-Solver++(3M) (Lu et al. 2022) with the D2 coefficient the Taylor expansion of the exponential
    integrator asks for: the x0'' term is int_0^h e^{u-h} u^2/2 du = h^2/2 - h + 1 - e^{-h} and
    D2 ~ h^2 x0''/2, so D2 gets 1 - 2 (e^{-h} - 1 + h) / h^2, twice the reference coefficient of
    dpmpp_3m; with it the method is third order (measured slope 3.4 vs 2.1, docs/samplers.md)."""
    return (yield from _dpmpp_3m(model, x, sigmas, cond, hook, d2_scale=2.0))
