"""Trajectory plumbing shared by the searches: schedules, rollouts of schedule segments through the
registry samplers, and each stochastic sampler's own per-step noise (EvoSearch's sigma_t)."""

from __future__ import annotations

import torch

from samplers.calls import StepMachine, step_machine
from samplers.errors import InvalidRequest
from samplers.grids import make_grid
from samplers.noise import SampleNoise
from samplers.registry import REGISTRY, sampler_machine


def schedule(model, steps: int, grid: str = "uniform_lambda", final_zero: bool = True) -> torch.Tensor:
    """The `grid` noise levels (VE coordinates) of `model`'s process with `steps` steps."""
    return make_grid(model.process, steps, grid, final_zero, getattr(model, "shift", 1.0))


def sampler_nfe(name: str, steps: int) -> int:
    return REGISTRY[name].nfe(steps)


@step_machine
def rollout(name: str, model, x: torch.Tensor, sigmas: torch.Tensor, cond, noise: SampleNoise | None,
            tick=None, options: dict | None = None) -> StepMachine[torch.Tensor]:
    """Run sampler `name` over a slice of the schedule (a valid schedule itself); returns x at its end."""
    if len(sigmas) < 2:
        return x
    out, _ = yield from sampler_machine(name, model, x, sigmas, cond, noise=noise, hook=tick, options=options)
    return out


def step_noise_std(name: str, sigma: float, sigma_next: float, options: dict | None = None) -> float:
    """Std (VE coordinates) of the fresh noise sampler `name` adds on the step sigma -> sigma_next, from the
    sampler's own spec (DDIM eta / DDPM: the posterior std; SDE-DPM-Solver++: sigma_next sqrt(1 - e^{-2h}),
    the std EvoSearch's flow pipelines return; Euler-Maruyama: sqrt(2 eta sigma dsigma))."""
    spec = REGISTRY[name]
    if sigma_next <= 0:
        return 0.0
    std = spec.step_noise(sigma, sigma_next, options or {}) if spec.step_noise is not None else 0.0
    if std <= 0:
        raise InvalidRequest(f"search.options.sampler: {name!r} adds no per-step noise to mutate with")
    return std


def initial_scale(model) -> float:
    """Std of the initial noise in VE coordinates (prior std in model coordinates over alpha(t_max))."""
    process = model.process
    return process.prior_std() / float(process.alpha(process.t_max))
