"""In-process generation: one request against one loaded model, the same path the server's engine runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from samplers import REGISTRY, SampleNoise, initial_noise, make_grid, run_sampler, with_guidance
from samplers.errors import InvalidRequest, NonFiniteOutput
from samplers.meanflow import meanflow_times

MAX_SAMPLES = 4096


@dataclass(frozen=True)
class GenerateRequest:
    """A validated-at-run request for continuous models (diffusion, flow, meanflow)."""

    sampler: str
    steps: int
    n: int = 1
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    class_label: int | None = None
    guidance: float | None = None
    grid: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def sample_seeds(self) -> list[int]:
        if self.seeds is not None:
            if len(self.seeds) != self.n:
                raise InvalidRequest(f"seeds: {len(self.seeds)} seeds given for n = {self.n} samples")
            return list(self.seeds)
        return [self.seed + k for k in range(self.n)]


def _labels(model, request: GenerateRequest):
    num_classes = getattr(model, "num_classes", None)
    if request.class_label is None:
        if request.guidance not in (None, 1.0):
            raise InvalidRequest("guidance: needs a class label (--class)")
        return None
    if num_classes is None:
        raise InvalidRequest("class_label: the model is unconditional")
    if not 0 <= request.class_label < num_classes:
        raise InvalidRequest(f"class_label: {request.class_label} is outside [0, {num_classes - 1}]")
    return torch.full((request.n,), request.class_label, dtype=torch.long)


def generate(loaded, request: GenerateRequest, hook=None) -> tuple[torch.Tensor, int, list[int]]:
    """Run `request` on a LoadedModel; returns (samples in model coordinates, NFE, seeds used)."""
    if not 1 <= request.n <= MAX_SAMPLES:
        raise InvalidRequest(f"n: {request.n} is outside [1, {MAX_SAMPLES}]")
    seeds = request.sample_seeds()
    noise = SampleNoise(seeds, torch.float32)
    model = loaded.model
    labels = _labels(model, request)
    spec = REGISTRY.get(request.sampler)
    if loaded.kind == "meanflow" and spec is not None and "meanflow" not in spec.kinds:
        model = model.as_flow_denoiser()  # any flow sampler on the boundary velocity u(z, t, t)
    if getattr(model, "kind", None) == "meanflow":
        if request.guidance not in (None, 1.0):
            raise InvalidRequest("guidance: MeanFlow models bake guidance into training; give no guidance")
        x = noise.randn(model.shape)
        times = meanflow_times(request.steps)
        out, nfe = run_sampler(request.sampler, model, x, times, labels, noise=noise, hook=hook,
                               options=request.options, kind="meanflow")
    else:
        model = with_guidance(model, request.guidance) if labels is not None else model
        sigmas = make_grid(model.process, request.steps, request.grid or loaded.entry.grid, shift=loaded.shift)
        x = initial_noise(model, noise)
        out, nfe = run_sampler(request.sampler, model, x, sigmas, labels, noise=noise, hook=hook,
                               options=request.options, kind=loaded.kind if loaded.kind != "meanflow" else "flow")
    if not torch.isfinite(out).all():
        raise NonFiniteOutput("the sampler produced NaN or Inf values; try more steps or a lower guidance scale")
    return out, nfe, seeds
