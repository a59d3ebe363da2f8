"""Noising processes x_t = alpha(t) x0 + sigma(t) eps, with lambda(t) = log(alpha/sigma) and its inverse.

Every process is also described by kappa(t) = sigma/alpha, the noise level in VE coordinates
(x / alpha = x0 + kappa * eps).  Samplers work in those coordinates (as k-diffusion and EDM do), so one
solver serves diffusion and flow models alike; `Process.t_of_kappa` maps a solver's noise level back to
the model's own time.  All arithmetic is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

F64 = torch.float64


def _as64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=F64)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy.interp) in torch; xp increasing; clamps at the ends."""
    x = x.to(F64)
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]), right=False).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = (x.clamp(xp[0], xp[-1]) - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)


class Process:
    """Base class: subclasses define log_alpha(t), sigma(t), t_of_lambda(lambda) and the time range."""

    name: str = "process"
    t_min: float
    t_max: float

    def log_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def lambda_(self, t) -> torch.Tensor:
        """Half log signal-to-noise ratio, log(alpha / sigma)."""
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def t_of_lambda(self, lam) -> torch.Tensor:
        raise NotImplementedError

    def kappa(self, t) -> torch.Tensor:
        """Noise level in VE coordinates, sigma / alpha = exp(-lambda)."""
        return torch.exp(-self.lambda_(t))

    def t_of_kappa(self, kappa) -> torch.Tensor:
        return self.t_of_lambda(-torch.log(_as64(kappa)))

    @property
    def kappa_min(self) -> float:
        return float(self.kappa(self.t_min))

    @property
    def kappa_max(self) -> float:
        return float(self.kappa(self.t_max))

    def prior_std(self) -> float:
        """Std of the initial noise in the model's own coordinates (diffusers convention)."""
        return 1.0


@dataclass(frozen=True)
class DiscreteVP(Process):
    """Discrete VP from a DDPM beta table (Ho et al. 2020), time t in [0, N-1] (diffusers timesteps).

    log(alpha) is interpolated linearly between table entries, as DPM-Solver's NoiseScheduleVP('discrete')
    does, so a non-integer t is valid and integer t gives the table exactly.
    """

    betas: tuple[float, ...]
    name: str = "discrete_vp"
    _log_alpha_table: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or len(b) < 2 or np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("betas must be a 1-D table of values in (0, 1)")
        object.__setattr__(self, "_log_alpha_table", _as64(0.5 * np.cumsum(np.log1p(-b))))

    @classmethod
    def from_schedule(cls, kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> DiscreteVP:
        return cls(tuple(float(b) for b in beta_table(kind, num_steps, beta_start, beta_end)))

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(len(self.betas) - 1)

    def log_alpha(self, t):
        grid = torch.arange(len(self.betas), dtype=F64)
        return _interp(_as64(t), grid, self._log_alpha_table)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def t_of_lambda(self, lam):
        # alpha^2 = sigmoid(2 lambda) exactly, so invert the interpolated log(alpha) table.
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * _as64(lam))
        grid = torch.arange(len(self.betas), dtype=F64)
        return _interp(log_alpha, self._log_alpha_table.flip(0), grid.flip(0))


def beta_table(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The DDPM beta tables diffusers names: linear, scaled_linear and squaredcos_cap_v2."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)
                         for i in range(num_steps)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; expected linear, scaled_linear or squaredcos_cap_v2")


@dataclass(frozen=True)
class CosineVP(Process):
    """Continuous cosine VP (Nichol & Dhariwal 2021), t in [t_min, t_max] of [0, 1]."""

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946  # DPM-Solver's cut-off: alpha -> 0 at t = 1
    name: str = "cosine_vp"

    def log_alpha(self, t):
        t = _as64(t)
        c = math.pi / 2 / (1 + self.s)
        return torch.log(torch.cos(c * (t + self.s))) - math.log(math.cos(c * self.s))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def t_of_lambda(self, lam):
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * _as64(lam))
        c = math.pi / 2 / (1 + self.s)
        return torch.arccos(torch.exp(log_alpha + math.log(math.cos(c * self.s)))) / c - self.s


@dataclass(frozen=True)
class VE(Process):
    """Variance exploding / EDM (Karras et al. 2022): alpha = 1, sigma = t."""

    t_min: float = 0.002
    t_max: float = 80.0
    name: str = "ve"

    def log_alpha(self, t):
        return torch.zeros_like(_as64(t))

    def sigma(self, t):
        return _as64(t)

    def t_of_lambda(self, lam):
        return torch.exp(-_as64(lam))

    def prior_std(self) -> float:
        return self.t_max


@dataclass(frozen=True)
class RectifiedFlow(Process):
    """Rectified flow / linear interpolant (Liu et al. 2022): alpha = 1 - t, sigma = t, t = 1 is noise.

    t_max stops short of 1, where alpha = 0 and VE coordinates are undefined; the initial noise is
    then drawn at t_max with the standard-normal prior, as diffusers' flow schedulers do at t = 1.
    """

    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3
    name: str = "rectified_flow"

    def log_alpha(self, t):
        return torch.log1p(-_as64(t))

    def sigma(self, t):
        return _as64(t)

    def t_of_lambda(self, lam):
        return torch.sigmoid(-_as64(lam))


PROCESSES = {"discrete_vp": DiscreteVP, "cosine_vp": CosineVP, "ve": VE, "rectified_flow": RectifiedFlow}
