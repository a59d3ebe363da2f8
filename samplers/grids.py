"""Time grids: uniform t, uniform lambda (logSNR), EDM/Karras rho = 7 and quadratic t.

Each returns steps + 1 decreasing noise levels in VE coordinates (kappa = sigma / alpha), from the
process's t_max to its t_min.  With ``final_zero`` the last level is replaced by 0, so the final step
returns the data prediction (the diffusers and k-diffusion convention: `steps` network evaluations
for a one-evaluation-per-step solver, none of them at t_min).
"""

from __future__ import annotations

import torch

from .errors import InvalidRequest, quote
from .processes import F64, Process


def uniform_t(process: Process, steps: int) -> torch.Tensor:
    """Uniform in the model's own time (DDIM's and diffusers' 'linspace' spacing)."""
    return process.kappa(torch.linspace(process.t_max, process.t_min, steps + 1, dtype=F64))


def uniform_lambda(process: Process, steps: int) -> torch.Tensor:
    """Uniform in lambda = log(alpha / sigma) (DPM-Solver's 'logSNR' spacing, Lu et al. 2022)."""
    lam = torch.linspace(float(process.lambda_(process.t_max)), float(process.lambda_(process.t_min)),
                         steps + 1, dtype=F64)
    return torch.exp(-lam)


def karras(process: Process, steps: int, rho: float = 7.0) -> torch.Tensor:
    """EDM's schedule (Karras et al. 2022, eq. 5): uniform in kappa^(1/rho)."""
    lo, hi = process.kappa_min ** (1 / rho), process.kappa_max ** (1 / rho)
    return torch.linspace(hi, lo, steps + 1, dtype=F64) ** rho


def quadratic_t(process: Process, steps: int) -> torch.Tensor:
    """Quadratic in t (DPM-Solver's 'time_quadratic'): uniform in sqrt(t)."""
    ts = torch.linspace(process.t_max**0.5, process.t_min**0.5, steps + 1, dtype=F64) ** 2
    return process.kappa(ts)


GRIDS = {"uniform_t": uniform_t, "uniform_lambda": uniform_lambda, "karras": karras,
         "quadratic_t": quadratic_t}


def shift_times(process: Process, sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024), applied to a grid's times."""
    t = process.t_of_kappa(sigmas.clamp_min(process.kappa_min))
    return process.kappa((shift * t / (1 + (shift - 1) * t)).clamp(process.t_min, process.t_max))


def make_grid(process: Process, steps: int, kind: str = "uniform_lambda", final_zero: bool = True,
              shift: float = 1.0) -> torch.Tensor:
    """The `kind` grid with `steps` steps for `process`, optionally ending at kappa = 0 and time-shifted."""
    if kind not in GRIDS:
        raise InvalidRequest(f"grid: unknown grid {quote(kind)}; expected one of {sorted(GRIDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidRequest(f"steps: must be a positive integer, got {steps!r}")
    sigmas = GRIDS[kind](process, steps)
    if shift != 1.0:
        sigmas = shift_times(process, sigmas, shift)
    if final_zero:
        sigmas = torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
    return sigmas


def kappas_of_times(process: Process, times) -> torch.Tensor:
    """Noise levels for explicit model times (for example a diffusers scheduler's timesteps)."""
    return process.kappa(torch.as_tensor(times, dtype=F64))
