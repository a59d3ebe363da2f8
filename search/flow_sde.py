"""Inference-time SDE and interpolant conversion for flow models (Kim et al. 2025, "Inference-Time Scaling
for Flow Models via Stochastic Generation and Rollover Budget Forcing", arXiv 2503.19385, Sec. 4).

Notation of the paper: x_s = alpha_s x0 + sigma_s x1 with s = 1 noise and s = 0 data.  Any served model is
first read as the linear-path velocity u_t(x) = (x - x0_hat) / t (for a flow model this is its own
velocity back, since the adapter made x0_hat = x - t v), then
  * Eq. 11: moved to another interpolant by the scale-time transformation t_s = rho^-1(rho_bar(s)),
    c_s = sigma_bar_s / sigma_{t_s}:  u_bar_s(x) = (c_dot / c) x + c t_dot u_{t_s}(x / c);
  * Eq. 8: score from velocity, (alpha u - alpha_dot x) / (sigma (alpha_dot sigma - alpha sigma_dot));
  * Eq. 9: Euler-Maruyama proposal x_{s - ds} = x_s - [u - g^2/2 score] ds + g sqrt(ds) z, which has the
    ODE's marginals for any g >= 0 (Prop. 1);
  * the interpolant's Tweedie x0_hat = (sigma u - sigma_dot x) / (alpha_dot sigma - sigma_dot alpha).
The VP interpolant is the code's VPScheduler (beta_min 0.1, beta_max 20).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samplers.calls import evaluate, step_machine

F64 = torch.float64


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class Linear:
    """alpha = 1 - s, sigma = s (rectified flow, FLUX)."""

    name: str = "linear"

    def coefficients(self, s):
        s = torch.as_tensor(s, dtype=F64)
        return 1 - s, s, -torch.ones_like(s), torch.ones_like(s)


@dataclass(frozen=True)
class VariancePreserving:
    """VP with T(s) = s^2 (b1 - b0) / 2 + s b0: alpha = exp(-T/2), sigma = sqrt(1 - exp(-T)) (Eq. 12)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name: str = "vp"

    def coefficients(self, s):
        s = torch.as_tensor(s, dtype=F64)
        big_t = 0.5 * s**2 * (self.beta_max - self.beta_min) + s * self.beta_min
        d_big_t = s * (self.beta_max - self.beta_min) + self.beta_min
        alpha, sigma = torch.exp(-big_t / 2), torch.sqrt(-torch.expm1(-big_t))
        return alpha, sigma, -0.5 * d_big_t * alpha, 0.5 * d_big_t * torch.exp(-big_t) / sigma


INTERPOLANTS = {"linear": Linear(), "vp": VariancePreserving()}


def kappa(interp, s) -> torch.Tensor:
    """Noise level in VE coordinates (sigma / alpha) of interpolant time s."""
    alpha, sigma, _, _ = interp.coefficients(s)
    return sigma / alpha


@step_machine
def linear_velocity(model, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """u_t(x) on the linear path from the denoiser: x0_hat = D(x / (1 - t), t / (1 - t)), u = (x - x0_hat) / t."""
    t = torch.as_tensor(t, dtype=F64).expand(x.shape[0])
    x0 = yield evaluate(model, x / _b(1 - t, x), t / (1 - t), cond)
    return (x - x0) / _b(t, x)


@step_machine
def velocity(model, interp, x: torch.Tensor, s: torch.Tensor, cond=None) -> torch.Tensor:
    """u_bar_s(x) on `interp` from the model's linear-path velocity (Eq. 11; identity for Linear)."""
    s = torch.as_tensor(s, dtype=F64).expand(x.shape[0])
    if isinstance(interp, Linear):
        return (yield from linear_velocity.machine(model, x, s, cond))
    a, sg, da, dsg = interp.coefficients(s)
    t = sg / (a + sg)  # rho^-1 of the linear path at the SNR of (a, sg)
    c = a + sg  # sigma_bar / sigma_t
    # t_dot = sigma_t^2 (sg da - a dsg) / (sg^2 (sigma_t alpha_dot_t - alpha_t sigma_dot_t)), the last factor -1.
    t_dot = -(t**2) * (sg * da - a * dsg) / sg**2
    c_dot = (t * dsg - sg * t_dot) / t**2  # (sigma_t sg_dot - sg sigma_dot_t t_dot) / sigma_t^2
    u = yield from linear_velocity.machine(model, x / _b(c, x), t, cond)
    return _b(c_dot / c, x) * x + _b(c * t_dot, x) * u


def score_from_velocity(interp, x, u, s) -> torch.Tensor:
    """Eq. 8: grad log p_s(x) = (alpha u - alpha_dot x) / (sigma (alpha_dot sigma - alpha sigma_dot))."""
    a, sg, da, dsg = interp.coefficients(torch.as_tensor(s, dtype=F64).expand(x.shape[0]))
    return (_b(a, x) * u - _b(da, x) * x) / _b(sg * (da * sg - a * dsg), x)


def tweedie(interp, x, u, s) -> torch.Tensor:
    """Posterior mean x0_hat = (sigma u - sigma_dot x) / (alpha_dot sigma - sigma_dot alpha)."""
    a, sg, da, dsg = interp.coefficients(torch.as_tensor(s, dtype=F64).expand(x.shape[0]))
    return (_b(sg, x) * u - _b(dsg, x) * x) / _b(da * sg - dsg * a, x)


def diffusion_coefficient(kind: str, norm: float, s: torch.Tensor) -> torch.Tensor:
    """g_s: "square" = norm s^2 (paper App. F.1 and code, norm 3), "linear" = norm s, "zero" = the ODE."""
    s = torch.as_tensor(s, dtype=F64)
    return {"square": norm * s**2, "linear": norm * s, "zero": torch.zeros_like(s)}[kind]


def sde_step(interp, x, u, s, s_next, g, z) -> torch.Tensor:
    """Eq. 9 from s to s_next < s (per-sample tensors allowed): x - [u - g^2/2 score] ds + g sqrt(ds) z."""
    s = torch.as_tensor(s, dtype=F64).expand(x.shape[0])
    ds = s - torch.as_tensor(s_next, dtype=F64).expand(x.shape[0])
    g = torch.as_tensor(g, dtype=F64).expand(x.shape[0])
    drift = u - _b(g**2 / 2, x) * score_from_velocity(interp, x, u, s)
    return x - _b(ds, x) * drift + _b(g * ds.sqrt(), x) * z


def time_grid(kind: str, steps: int, s_max: float = 1.0) -> torch.Tensor:
    """steps + 1 decreasing times from s_max to 0 over a uniform tau: "exp" = sqrt(1 - (1 - tau)^2)
    (the code's time_schedule: exp), "quadratic" = 1 - (1 - tau)^2 (the paper's App. C text), "uniform"."""
    tau = torch.linspace(1, 0, steps + 1, dtype=F64)
    f = {"exp": lambda v: torch.sqrt(1 - (1 - v) ** 2), "quadratic": lambda v: 1 - (1 - v) ** 2,
         "uniform": lambda v: v}[kind]
    return f(tau) * s_max


def times_of_kappas(interp, kappas: torch.Tensor) -> torch.Tensor:
    """Interpolant times with the given VE noise levels (kappa increases with s; vectorized bisection)."""
    kappas = torch.as_tensor(kappas, dtype=F64)
    lo, hi = torch.zeros_like(kappas), torch.ones_like(kappas)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        up = kappa(interp, mid) <= kappas
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return torch.where(kappas > 0, lo, torch.zeros_like(lo))


def largest_time(interp, kappa_max: float) -> float:
    """The largest s in [0, 1] whose VE noise level is at most the model's kappa_max (bisection)."""
    if float(kappa(interp, 1.0)) <= kappa_max:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(kappa(interp, mid)) <= kappa_max else (lo, mid)
    return lo


@step_machine
def converted_sde(model, x, times: torch.Tensor, interp, g_kind: str = "square", g_norm: float = 3.0, cond=None,
                  noise=None):
    """Sample the converted SDE over `times` without any search (every proposal accepted); returns the
    state at the last time and the Tweedie estimate there.  With times ending at 0 the last step is the
    deterministic x0_hat of the state before it (as the samplers' final step to sigma = 0)."""
    times = torch.as_tensor(times, dtype=F64)
    last = len(times) - 1 if float(times[-1]) > 0 else len(times) - 2
    u = yield from velocity.machine(model, interp, x, times[0], cond)
    for i in range(last):
        g = diffusion_coefficient(g_kind, g_norm, times[i])
        z = noise.randn_like(x) if noise is not None else torch.zeros_like(x)
        x = sde_step(interp, x, u, times[i], times[i + 1], g, z)
        u = yield from velocity.machine(model, interp, x, times[i + 1], cond)
    return x, tweedie(interp, x, u, times[last])

