"""The per-step hook: progress, previews, cancellation, deadlines and search all observe StepInfo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each step (indices count from 0; x and x0_hat must not be mutated)."""

    step: int
    steps: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    x0_hat: torch.Tensor
    nfe: int = 0  # filled in by run_sampler from its call counter


Hook = Callable[[StepInfo], None]


def report(hook: Hook | None, step: int, steps: int, sigma, sigma_next, x, x0_hat) -> None:
    if hook is not None:
        hook(StepInfo(step, steps, float(sigma), float(sigma_next), x, x0_hat))
