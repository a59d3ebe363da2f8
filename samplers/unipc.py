"""UniPC (Zhao et al. 2023): the unified predictor UniP-p plus the corrector UniC, data prediction, bh2."""

from __future__ import annotations

import math

import torch

from .calls import evaluate
from .errors import InvalidRequest
from .hooks import report
from .registry import Option, register


def _coefficients(h: float, rks: list[float], variant: str) -> tuple[float, float, list[float]]:
    """phi_1 = e^{-h} - 1, B(h), and the right-hand side b of UniPC's linear system (Zhao et al. 2023,
    Algorithm 2; h_phi_k recursion)."""
    hh = -h
    phi1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial, b = phi1 / hh - 1, 1, []
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return phi1, b_h, b


def _unipc_update(x, history, lam_t: float, sigma_ratio: float, order: int, variant: str,
                  model_t: torch.Tensor | None):
    """One UniP-p prediction (model_t None) or UniC-p correction (model_t = D(x_t, t)), from the state x at
    the newest history point.  history holds (denoised, lambda), newest last."""
    m0, lam_s = history[-1]
    h = lam_t - lam_s
    rks, d1s = [], []
    for k in range(1, order):
        mk, lam_k = history[-1 - k]
        rk = (lam_k - lam_s) / h
        rks.append(rk)
        d1s.append((mk - m0) / rk)
    rks.append(1.0)
    phi1, b_h, b = _coefficients(h, rks, variant)
    R = torch.tensor([[rk ** (row) for rk in rks] for row in range(len(rks))], dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)
    x_base = sigma_ratio * x - phi1 * m0
    if model_t is None:  # predictor UniP-p uses the p - 1 past differences
        if not d1s:
            return x_base
        rho = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
        return x_base - b_h * sum(r * d for r, d in zip(rho, d1s))
    rho = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    correction = sum(r * d for r, d in zip(rho[:-1], d1s)) if d1s else 0
    return x_base - b_h * (correction + rho[-1] * (model_t - m0))


@register("unipc", order=3, when_to_use="UniPC bh2 (predictor order 2 + corrector): strong at 5-10 steps.",
          options={"order": Option(int, 2, 1, 3, help="predictor order p; the corrector adds one"),
                   "variant": Option(str, "bh2", choices=("bh1", "bh2"), help="B(h) choice"),
                   "corrector": Option(bool, True, help="apply UniC after every step but the last")})
def unipc(model, x, sigmas, cond=None, *, noise=None, hook=None, order: int = 2, variant: str = "bh2",
          corrector: bool = True):
    """UniPC multistep (Zhao et al. 2023): UniP-p predictor, UniC corrector reusing D(x_t) (no extra NFE),
    order warm-up and min(order, steps left) at the end as diffusers' lower_order_final."""
    if variant not in ("bh1", "bh2"):
        raise InvalidRequest(f"option 'variant': {variant!r} is not one of ['bh1', 'bh2']")
    steps = len(sigmas) - 1
    history: list[tuple[torch.Tensor, float]] = []
    x_prev, prev_order = None, 0
    for i in range(steps):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield evaluate(model, x, sigmas[i], cond)
        lam_s = -math.log(s)
        if corrector and x_prev is not None:
            x = _unipc_update(x_prev, history, lam_s, s / float(sigmas[i - 1]), prev_order, variant, denoised)
        history = (history + [(denoised, lam_s)])[-order:]
        this_order = min(order, len(history), steps - i)
        x_prev, prev_order = x, this_order
        x = denoised if t == 0 else _unipc_update(x, history, -math.log(t), t / s, this_order, variant, None)
        report(hook, i, steps, s, t, x, denoised)
    return x
