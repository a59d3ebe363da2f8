"""The sampling math: processes, the denoiser contract, adapters, grids, per-sample noise, samplers."""

from . import (  # noqa: F401  (each module registers its samplers)
    bd3lm,
    block_diffusion,
    evodiff,
    llada,
    masked,
    meanflow,
    momentum,
    ode,
    sde,
    unipc,
)
from .denoiser import NULL_LABEL, ClassifierFreeGuidance, Denoiser, with_guidance
from .errors import InvalidRequest
from .grids import make_grid
from .hooks import StepInfo
from .noise import SampleNoise, initial_noise
from .registry import REGISTRY, run_sampler, validate

__all__ = ["NULL_LABEL", "REGISTRY", "ClassifierFreeGuidance", "Denoiser", "InvalidRequest", "SampleNoise",
           "StepInfo", "initial_noise", "make_grid", "run_sampler", "validate", "with_guidance"]
