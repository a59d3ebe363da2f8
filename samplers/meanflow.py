"""MeanFlow one-step and few-step sampling (Geng et al. 2025, arXiv 2505.13447).

The model predicts the average velocity u(z, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau on the linear
path z_t = (1 - t) x + t eps (t = 1 is noise), and a step is z_r = z_t - (t - r) u(z_t, r, t) (eq. 12).
Its networks are conditioned on (t, h = t - r).  A MeanFlow model's boundary u(z, t, t) is the
instantaneous velocity, so `AverageVelocity.as_flow_denoiser()` also serves it to every flow sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .calls import NetworkCall, evaluate
from .denoiser import Denoiser
from .hooks import report
from .processes import F64, RectifiedFlow
from .registry import register


@dataclass(frozen=True)
class AverageVelocity:
    """u(z, r, t, labels) in native time; its sampler schedule is a decreasing tensor of times in [0, 1]."""

    u: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    shape: tuple[int, ...]
    num_classes: int | None = None
    kind: str = "meanflow"
    sigma_min: float = 0.0  # the schedule is in time t itself: run_sampler checks it lies in [0, 1]
    sigma_max: float = 1.0

    def network_call(self, z, r, t, cond=None) -> NetworkCall:
        n = z.shape[0]
        r = torch.as_tensor(r, dtype=F64).expand(n)
        t = torch.as_tensor(t, dtype=F64).expand(n)
        return NetworkCall(self.u, (z, r, t, cond), lambda out: out.to(z.dtype))

    def __call__(self, z, r, t, cond=None):
        return self.network_call(z, r, t, cond).run()

    def as_flow_denoiser(self) -> Denoiser:
        """The instantaneous-velocity model u(z, t, t) as a rectified-flow denoiser (its network calls go
        to the same `u`, so they batch with the MeanFlow requests on this model)."""
        cached = self.__dict__.get("_flow_denoiser")
        if cached is None:  # one instance per model, so that its calls batch across requests
            cached = Denoiser(BoundaryVelocity(self.u), RectifiedFlow(), "velocity", self.shape, self.num_classes,
                              kind="flow")
            object.__setattr__(self, "_flow_denoiser", cached)
        return cached


@dataclass(frozen=True)
class BoundaryVelocity:
    """v(z, t) = u(z, t, t): the instantaneous velocity on the boundary r = t (Geng et al. 2025, eq. 6)."""

    u: Callable

    def network_call(self, z, t, labels=None) -> NetworkCall:
        return NetworkCall(self.u, (z, t, t, labels))

    def __call__(self, z, t, labels=None):
        return self.u(z, t, t, labels)


def meanflow_times(steps: int) -> torch.Tensor:
    """Uniform times 1 -> 0 (the 2-NFE schedule [1, 0.5, 0] is not fixed by the paper; uniform is ours)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=F64)


@register("meanflow", kinds=("meanflow",), order=1, max_steps=64,
          when_to_use="MeanFlow average-velocity models: 1 NFE (or a few) from noise to data.")
def meanflow(model, z, times, cond=None, *, noise=None, hook=None):
    """MeanFlow sampling (Geng et al. 2025, eq. 12 / Algorithm 2): z_r = z_t - (t - r) u(z_t, r, t).

    `model` is an AverageVelocity, `z` starts as standard normal noise at times[0] (normally 1)."""
    steps = len(times) - 1
    for i in range(steps):
        t, r = times[i], times[i + 1]
        u = yield evaluate(model, z, r, t, cond)
        x0_hat = z - t * u  # the clean estimate if this interval ran to 0
        z = z - (t - r) * u
        report(hook, i, steps, t, r, z, x0_hat)
    return z
