"""Momentum samplers (Wizadwongsa et al., ICLR 2024, arXiv 2307.11118): heavy ball (HB) on
DPM-Solver++(2M) and on PLMS, and generalized heavy ball (GHVB).

PLMS-type methods integrate the DDIM ODE dx = eps dsigma in VE coordinates (x / alpha, sigma / alpha),
with eps = (x - D(x, sigma)) / sigma.  beta = 1 reproduces the base method exactly.
"""

from __future__ import annotations

import math

from .calls import evaluate
from .hooks import report
from .ode import dpmpp_first_order, midpoint_direction
from .registry import Option, register

# Adams-Bashforth mixers AB_k^b (paper, Sec. 4; numerators over the given denominator * b), newest first.
_MIXERS = {
    1: (lambda b: (b,), 1),
    2: (lambda b: (2 + b, -(2 - b)), 2),
    3: (lambda b: (18 + 5 * b, -(24 - 8 * b), 6 - b), 12),
    4: (lambda b: (46 + 9 * b, -(78 - 19 * b), 42 - 5 * b, -(10 - b)), 24),
    5: (lambda b: (1650 + 251 * b, -(3420 - 646 * b), 2880 - 264 * b, -(1380 - 106 * b), 270 - 19 * b), 720),
}


def ab_mix(history: list, order: int, b: float):
    """AB_k^b(e_n, e_{n-1}, ...) over the newest-first history, at order min(k, len(history))."""
    k = min(order, len(history))
    numerators, denominator = _MIXERS[k]
    return sum(c * e for c, e in zip(numerators(b), history)) / (denominator * b)


BETA = Option(float, 0.8, 0.01, 1.0, help="momentum beta; 1 = no momentum (the base method)")
ORDER = Option(int, 2, 1, 5, help="multistep order k")


HB_FINAL_STEP = Option(str, "ours", choices=("ours", "reference"),
                       help="last step: 'ours' = first order without momentum only when it goes to sigma = 0; "
                            "'reference' = also below 10 steps (the official momentum-diffusion code)")


@register("hb", order=1, options={"beta": BETA, "final_step": HB_FINAL_STEP},
          when_to_use="Heavy-ball momentum on DPM-Solver++(2M): fewer divergent samples at high guidance.")
def hb(model, x, sigmas, cond=None, *, noise=None, hook=None, beta: float = 0.8, final_step: str = "ours"):
    """HB on DPM-Solver++(2M) (Wizadwongsa et al. 2024, Sec. 4.2; official dpm_solver_pytorch.py): the
    velocity starts at the first data prediction D_0, each second-order step sets v = (1 - beta) v + beta D_2M
    and takes the first-order update with v; the first step and a final step to sigma = 0 (with
    final_step = "reference" also the last step of a run under 10 steps) are first order, momentum-free."""
    steps = len(sigmas) - 1
    old_denoised, h_last, velocity = None, None, None
    for i in range(steps):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield evaluate(model, x, sigmas[i], cond)
        if velocity is None:
            velocity = denoised
        reference_last = final_step == "reference" and i == steps - 1 and steps < 10
        if old_denoised is None or t == 0 or reference_last:
            x_next = dpmpp_first_order(x, denoised, s, t)
        else:
            d = midpoint_direction(denoised, old_denoised, math.log(s / t), h_last)
            velocity = (1 - beta) * velocity + beta * d
            x_next = dpmpp_first_order(x, velocity, s, t)
        if t > 0:
            h_last = math.log(s / t)
        x, old_denoised = x_next, denoised
        report(hook, i, steps, s, t, x, denoised)
    return x


def _plms_family(model, x, sigmas, cond, hook, direction):
    """Shared loop of PLMS-type methods: eps from the model, `direction(eps) -> U`, x += U dsigma."""
    steps = len(sigmas) - 1
    for i in range(steps):
        s, t = sigmas[i], sigmas[i + 1]
        denoised = yield evaluate(model, x, s, cond)
        x = x + (t - s) * direction((x - denoised) / s)
        report(hook, i, steps, s, t, x, denoised)
    return x


@register("plms", order=4, options={"order": Option(int, 4, 1, 5, help="multistep order k")},
          when_to_use="PLMS / pseudo linear multistep (Liu et al. 2022) with Adams-Bashforth warm-up.")
def plms(model, x, sigmas, cond=None, *, noise=None, hook=None, order: int = 4):
    """PLMS-k (Liu et al. 2022, eq. 12 multistep form): Adams-Bashforth over past eps, lower order warm-up."""
    history = []

    def direction(eps):
        history.insert(0, eps)
        del history[order:]
        return ab_mix(history, order, 1.0)
    return (yield from _plms_family(model, x, sigmas, cond, hook, direction))


@register("plms_hb", order=1, options={"order": ORDER, "beta": BETA},
          when_to_use="PLMS with heavy-ball momentum: stable high-order multistep at high guidance.")
def plms_hb(model, x, sigmas, cond=None, *, noise=None, hook=None, order: int = 2, beta: float = 0.8):
    """PLMS + HB (Wizadwongsa et al. 2024, eq. 13): e' = AB_k^1(eps history); v = (1 - beta) v + beta e'."""
    history, state = [], {}

    def direction(eps):
        history.insert(0, eps)
        del history[order:]
        mixed = ab_mix(history, order, 1.0)
        state["v"] = mixed if "v" not in state else (1 - beta) * state["v"] + beta * mixed
        return state["v"]
    return (yield from _plms_family(model, x, sigmas, cond, hook, direction))


@register("ghvb", order=2, options={"order": ORDER, "beta": BETA},
          when_to_use="Generalized heavy ball: order-k accuracy with momentum's stability; beta trades them.")
def ghvb(model, x, sigmas, cond=None, *, noise=None, hook=None, order: int = 2, beta: float = 0.8):
    """GHVB (Wizadwongsa et al. 2024, eq. 15): v_n = (1 - beta) v_{n-1} + beta eps_n, U = AB_k^beta over the
    velocity history (velocities, not eps, are stored)."""
    velocities = []

    def direction(eps):
        v = eps if not velocities else (1 - beta) * velocities[0] + beta * eps
        velocities.insert(0, v)
        del velocities[order:]
        return ab_mix(velocities, order, beta)
    return (yield from _plms_family(model, x, sigmas, cond, hook, direction))
