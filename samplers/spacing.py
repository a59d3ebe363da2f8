"""Diffusers' time grids: timestep spacings over a discrete beta table and shifted flow-matching sigmas.

A pretrained pipeline's scheduler config fixes which noise levels diffusers would visit for a given number
of steps (`timestep_spacing`, `steps_offset`, Karras / exponential sigmas, the final sigma, SD3's shift,
FLUX's resolution-dependent shift).  These functions compute the same levels from the config values, as
noise levels in VE coordinates (kappa = sigma / alpha, decreasing, one more than the steps), so any of our
samplers can run on the grid the checkpoint was tuned for.  The rule follows the diffusers scheduler that
implements the sampler: Euler's spacing for `euler`, DDIM's for `ddim`, DPM-Solver's (steps + 1 points,
last dropped) for the multistep solvers.  Only numpy / torch; float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import InvalidRequest

SPACINGS = ("linspace", "leading", "trailing")
RULES = ("euler", "ddim", "dpm")


def discrete_timesteps(rule: str, spacing: str, steps: int, num_train: int = 1000, offset: int = 0) -> np.ndarray:
    """The model timesteps (decreasing) diffusers' Euler / DDIM / DPM-Solver schedulers pick for `steps`."""
    if spacing not in SPACINGS:
        raise InvalidRequest(f"timestep_spacing: {spacing!r} is not one of {list(SPACINGS)}")
    if rule not in RULES:
        raise ValueError(f"unknown spacing rule {rule!r}; expected one of {RULES}")
    if steps > num_train:
        raise InvalidRequest(f"steps: {steps} is more than the model's {num_train} training timesteps")
    n = steps + 1 if rule == "dpm" else steps
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / steps)) - 1.0
    if spacing == "leading":
        ts = (np.arange(0, n) * (num_train // n)).round()[::-1] + offset
    else:
        ts = np.linspace(0, num_train - 1, n)[::-1]
        ts = ts if rule == "euler" else ts.round()
    return np.ascontiguousarray(ts[:steps] if rule == "dpm" else ts, dtype=np.float64)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """EDM's schedule (Karras et al. 2022, eq. 5) with n points, as diffusers' use_karras_sigmas."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """Geometric sigmas from sigma_max to sigma_min (diffusers' use_exponential_sigmas)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def discrete_vp_grid(table: np.ndarray, steps: int, *, rule: str, spacing: str = "leading", offset: int = 0,
                     sigmas: str = "default", final: str = "zero") -> torch.Tensor:
    """Noise levels for a discrete VP model; `table[i]` is kappa at training timestep i (increasing).

    `sigmas` is "default" (the table at the spaced timesteps, interpolated linearly in kappa as diffusers'
    Euler does for fractional timesteps), "karras" or "exponential"; `final` is "zero" or "sigma_min"
    (the table's first entry, where DDIM lands without `set_alpha_to_one`)."""
    table = np.asarray(table, dtype=np.float64)
    ts = discrete_timesteps(rule, spacing, steps, len(table), offset)
    if ts.max() > len(table) - 1 or ts.min() < 0:
        raise InvalidRequest(f"steps_offset: {offset} moves timesteps outside [0, {len(table) - 1}]")
    levels = np.interp(ts, np.arange(len(table)), table)
    if sigmas != "default":
        # Euler ranges over the spaced levels, DPM-Solver over the whole table (diffusers' in_sigmas).
        hi, lo = (levels[0], levels[-1]) if rule == "euler" else (table[-1], table[0])
        convert = {"karras": karras_sigmas, "exponential": exponential_sigmas}[sigmas]
        levels = convert(hi, lo, steps)
    last = 0.0 if final == "zero" else float(table[0])
    return torch.as_tensor(np.concatenate([levels, [last]]), dtype=torch.float64)


def time_shift(t: np.ndarray, shift: float) -> np.ndarray:
    """SD3's shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def dynamic_time_shift(t: np.ndarray, mu: float, kind: str = "exponential") -> np.ndarray:
    """FLUX's resolution-dependent shift: e^mu / (e^mu + (1/t - 1)) (or the linear mu / (mu + (1/t - 1)))."""
    with np.errstate(divide="ignore"):
        odds = 1 / t - 1
    scale = math.exp(mu) if kind == "exponential" else mu
    return scale / (scale + odds)


def flow_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """mu linear in the number of latent patches (FLUX's calculate_shift), from the scheduler config."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flow_times(steps: int, *, num_train: int = 1000, shift: float = 1.0, mu: float | None = None,
               shift_kind: str = "exponential", shift_terminal: float | None = None, sigmas: str = "default",
               start: np.ndarray | None = None) -> np.ndarray:
    """Rectified-flow times t (1 = noise) as FlowMatchEulerDiscreteScheduler sets them, ending with 0.

    Without `start` the times run linearly from 1 to the scheduler's smallest training sigma (which is
    itself shifted by a static shift, so diffusers shifts that end twice); a pipeline may give its own
    `start` times (FLUX: linspace(1, 1/steps, steps)).  `mu` selects the dynamic shift."""
    if start is None:
        t_min = 1.0 / num_train if mu is not None else float(time_shift(np.float64(1.0 / num_train), shift))
        t = np.linspace(1.0, t_min, steps)
    else:
        t = np.asarray(start, dtype=np.float64)
    t = dynamic_time_shift(t, mu, shift_kind) if mu is not None else time_shift(t, shift)
    if shift_terminal:
        if t[-1] >= 1:
            raise InvalidRequest("steps: a terminal shift (shift_terminal) needs at least 2 steps")
        t = 1 - (1 - t) / ((1 - t[-1]) / (1 - shift_terminal))
    if sigmas != "default":
        convert = {"karras": karras_sigmas, "exponential": exponential_sigmas}[sigmas]
        t = convert(float(t[0]), float(t[-1]), steps)
    return np.concatenate([t, [0.0]])


def flow_kappas(times: np.ndarray) -> torch.Tensor:
    """VE noise levels t / (1 - t) of flow times; t = 1 (pure noise) maps to inf."""
    t = torch.as_tensor(np.asarray(times), dtype=torch.float64)
    return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t).clamp_min(1e-300))
