"""One request against one loaded model, for every model kind: the path the CLI and the engine both run."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from samplers import REGISTRY, SampleNoise, initial_noise, make_grid, run_sampler, with_guidance
from samplers.errors import InvalidRequest, NonFiniteOutput
from samplers.meanflow import meanflow_times
from samplers.noise import MAX_SEED

MAX_SAMPLES = 4096


@dataclass(frozen=True)
class SearchRequest:
    """Test-time search instead of one sampler run: method, NFE budget per sample, verifier."""

    method: str
    budget_nfe: int
    verifier: str
    options: dict[str, Any] = field(default_factory=dict)
    verifier_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateRequest:
    """A request in plain Python; every field is validated before any compute."""

    sampler: str
    steps: int | None
    n: int = 1
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    class_label: int | None = None
    guidance: float | None = None
    grid: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: tuple[int, ...] | None = None  # masked models: -1 marks positions to sample
    prompt_text: str | None = None
    search: SearchRequest | None = None

    def sample_seeds(self) -> list[int]:
        if self.seeds is not None:
            if len(self.seeds) != self.n:
                raise InvalidRequest(f"seeds: {len(self.seeds)} seeds given for {self.n} samples")
            seeds = list(self.seeds)
        else:
            seeds = [self.seed + k for k in range(self.n)]
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise InvalidRequest("seeds: every seed must lie in [0, 2^63 - 1]")
        return seeds


@dataclass(frozen=True)
class GenerateResult:
    samples: torch.Tensor  # images in model coordinates, or token ids (n, L) for masked models
    nfe: int
    seeds: list[int]
    texts: list[str] | None = None
    rewards: list[float] | None = None


def _labels(model, request: GenerateRequest):
    num_classes = getattr(model, "num_classes", None)
    if request.class_label is None:
        if request.guidance not in (None, 1.0):
            raise InvalidRequest("guidance: classifier-free guidance needs a class_label")
        return None
    if num_classes is None:
        raise InvalidRequest("class_label: the model is unconditional")
    if not 0 <= request.class_label < num_classes:
        raise InvalidRequest(f"class_label: {request.class_label} is outside [0, {num_classes - 1}]")
    return torch.full((request.n,), request.class_label, dtype=torch.long)


def _check_finite(out: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(out).all():
        raise NonFiniteOutput("the sampler produced NaN or Inf values; try more steps or a lower guidance scale")
    return out


def _continuous(loaded, model, request: GenerateRequest, hook) -> GenerateResult:
    seeds = request.sample_seeds()
    noise = SampleNoise(seeds, torch.float64)  # sampler state in float64, as EDM keeps it; networks stay fp32
    labels = _labels(model, request)
    spec = REGISTRY.get(request.sampler)
    if loaded.kind == "meanflow" and spec is not None and "meanflow" not in spec.kinds:
        model = model.as_flow_denoiser()  # any flow sampler runs on the boundary velocity u(z, t, t)
    if getattr(model, "kind", None) == "meanflow":
        if request.guidance not in (None, 1.0):
            raise InvalidRequest("guidance: MeanFlow models bake guidance into training; leave it unset")
        out, nfe = run_sampler(request.sampler, model, noise.randn(model.shape), meanflow_times(request.steps),
                               labels, noise=noise, hook=hook, options=request.options, kind="meanflow")
        return GenerateResult(_check_finite(out), nfe, seeds)
    guided = with_guidance(model, request.guidance) if labels is not None else model
    sigmas = make_grid(model.process, request.steps, request.grid or loaded.entry.grid, shift=loaded.shift)
    kind = "flow" if loaded.kind == "meanflow" else loaded.kind
    out, nfe = run_sampler(request.sampler, guided, initial_noise(model, noise), sigmas, labels, noise=noise,
                           hook=hook, options=request.options, kind=kind)
    return GenerateResult(_check_finite(out), nfe, seeds)


def masked_template(model, request: GenerateRequest) -> torch.Tensor:
    """The (L,) token template: prompt ids (-1 = sample here) or text, padded with masks to the length."""
    if request.prompt_tokens is not None and request.prompt_text:
        raise InvalidRequest("prompt: give prompt_tokens or prompt_text, not both")
    if request.prompt_text:
        ids = model.encode(request.prompt_text)
    elif request.prompt_tokens is not None:
        ids = [model.mask_id if t == -1 else t for t in request.prompt_tokens]
    else:
        ids = []
    if len(ids) > model.length:
        raise InvalidRequest(f"prompt: {len(ids)} tokens is longer than the model's length {model.length}")
    ids = list(ids) + [model.mask_id] * (model.length - len(ids))
    return torch.tensor(ids, dtype=torch.long)


def _masked(loaded, model, request: GenerateRequest, hook) -> GenerateResult:
    from samplers.masked import run_masked_sampler

    if request.class_label is not None or request.guidance not in (None, 1.0):
        raise InvalidRequest("class_label: masked models take a prompt, not a class label or guidance")
    seeds = request.sample_seeds()
    tokens = masked_template(model, request).expand(request.n, -1).clone()
    steps = request.steps
    spec = REGISTRY.get(request.sampler)
    if steps is None and spec is not None and "steps" in inspect.signature(spec.fn).parameters:
        steps = loaded.entry.default_steps
    out, nfe = run_masked_sampler(request.sampler, model, tokens, steps=steps, noise=SampleNoise(seeds),
                                  hook=hook, options=request.options)
    nfe = int(torch.as_tensor(nfe).max()) if torch.is_tensor(nfe) else int(nfe)
    return GenerateResult(out, nfe, seeds, [model.decode(row) for row in out])


def _search(loaded, model, request: GenerateRequest, hook, resources) -> GenerateResult:
    """Test-time search (search/): one search per seed; particles share the engine's batched forwards."""
    from search import build_verifier, run_search

    if loaded.kind == "masked":
        raise InvalidRequest("search: test-time search serves image models (diffusion, flow, meanflow)")
    seeds = request.sample_seeds()
    labels = _labels(model, request)
    if loaded.kind == "meanflow":
        model = model.as_flow_denoiser()
    kind = "flow" if loaded.kind == "meanflow" else loaded.kind
    spec = request.search
    verifier = build_verifier(spec.verifier, spec.verifier_options, {**resources, "model": model}, kind)
    result = run_search(spec.method, model, verifier=verifier, budget_nfe=spec.budget_nfe, cond=labels, seeds=seeds,
                        steps=request.steps, guidance=request.guidance if labels is not None else None,
                        options=spec.options, hook=hook, kind=kind, trace=False)
    return GenerateResult(_check_finite(result.samples), result.nfe, list(result.seeds),
                          rewards=[float(r) for r in result.rewards])


GENERATORS: dict[str, Callable] = {"diffusion": _continuous, "flow": _continuous, "meanflow": _continuous,
                                   "masked": _masked}


def generate(loaded, request: GenerateRequest, hook=None, model=None, resources=None) -> GenerateResult:
    """Run `request` on a LoadedModel (through `model`, e.g. a batching facade, when given); `resources`
    are what verifiers need (loaded classifiers) when the request carries a search."""
    if isinstance(request.n, bool) or not 1 <= request.n <= MAX_SAMPLES:
        raise InvalidRequest(f"num_samples: {request.n} is outside [1, {MAX_SAMPLES}]")
    if not request.sampler:
        raise InvalidRequest("sampler: name is empty")
    model = model if model is not None else loaded.model
    if request.search is not None:
        return _search(loaded, model, request, hook, resources or {})
    return GENERATORS[loaded.kind](loaded, model, request, hook)
