"""The sampler registry: one explicit dict name -> SamplerSpec, validated requests, one run entry point.

The server validates names and options against it and generates ListSamplers from it.  A sampler is
written as a step machine (samplers/calls.py): a generator function
``machine(model, x, sigmas, cond, *, noise=None, hook=None, **options)`` that yields each network call and
returns x.  `register` keeps the generator in the spec (`spec.machine`, what the engine advances one call
at a time) and returns a plain function of the same signature that drives it to completion, so
``dpmpp_2m(model, x, sigmas)`` is still an ordinary call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .calls import NetworkCall, StepMachine, drive, evaluate, evaluate_canvas, evaluate_logits, step_machine
from .errors import InvalidRequest, quote
from .hooks import Hook

MAX_STEPS = 1000


@dataclass(frozen=True)
class Option:
    """A typed sampler option with its default and its closed range (or allowed choices)."""

    type: type
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    help: str = ""

    def check(self, name: str, value: Any) -> Any:
        if self.type is bool:
            if not isinstance(value, bool):
                raise InvalidRequest(f"option {name!r}: expected true or false, got {value!r}")
            return value
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"option {name!r}: expected a number, got {value!r}")
            if self.type is int and float(value) != int(value):
                raise InvalidRequest(f"option {name!r}: expected an integer, got {value!r}")
            value = self.type(value)
            if not math.isfinite(value):
                raise InvalidRequest(f"option {name!r}: must be finite, got {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise InvalidRequest(f"option {name!r}: {value} is below the minimum {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise InvalidRequest(f"option {name!r}: {value} is above the maximum {self.maximum}")
            return value
        if self.choices is not None and value not in self.choices:
            raise InvalidRequest(f"option {name!r}: {value!r} is not one of {list(self.choices)}")
        return value


@dataclass(frozen=True)
class SamplerSpec:
    """Everything the server and the docs need to know about one sampler."""

    name: str
    machine: Callable[..., StepMachine]  # the generator function; `fn` is the same sampler driven directly
    kinds: tuple[str, ...]
    nfe_per_step: float
    order: int
    stochastic: bool
    when_to_use: str
    options: dict[str, Option] = field(default_factory=dict)
    max_steps: int = MAX_STEPS
    extra_nfe: int = 0  # evaluations beyond nfe_per_step * steps (negative when the last step is free)
    # std (VE coordinates) of the fresh noise one step sigma -> sigma_next adds, given the options; None for
    # samplers that add none (search mutates intermediate states with it: EvoSearch's sigma_t)
    step_noise: Callable[[float, float, dict], float] | None = None
    one_step_per_mask: bool = False  # masked samplers that unmask one token per step: steps are not asked

    def nfe(self, steps: int) -> int:
        return int(math.ceil(self.nfe_per_step * steps)) + self.extra_nfe

    @property
    def fn(self) -> Callable:
        return step_machine(self.machine)


REGISTRY: dict[str, SamplerSpec] = {}


def register(name: str, *, kinds=("diffusion", "flow"), nfe_per_step: float = 1, order: int = 1,
             stochastic: bool = False, when_to_use: str, options: dict[str, Option] | None = None,
             max_steps: int = MAX_STEPS, extra_nfe: int = 0, step_noise=None, one_step_per_mask: bool = False):
    """Decorator: add a sampler step machine to REGISTRY under `name`; returns its driven plain form."""
    def add(machine):
        if name in REGISTRY:
            raise ValueError(f"sampler {name!r} registered twice")
        REGISTRY[name] = SamplerSpec(name, machine, tuple(kinds), nfe_per_step, order, stochastic, when_to_use,
                                     dict(options or {}), max_steps, extra_nfe, step_noise, one_step_per_mask)
        return step_machine(machine)
    return add


def get_spec(name: str) -> SamplerSpec:
    if not name:
        raise InvalidRequest("sampler: name is empty")
    if name not in REGISTRY:
        raise InvalidRequest(f"sampler: unknown sampler {quote(name)}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def validate(name: str, steps: int, options: dict[str, Any] | None = None, kind: str | None = None
             ) -> tuple[SamplerSpec, dict[str, Any]]:
    """Check a sampler request; return its spec and the full option dict with defaults filled in."""
    spec = get_spec(name)
    if kind is not None and kind not in spec.kinds:
        raise InvalidRequest(f"sampler: {name!r} does not apply to {kind} models (it serves {list(spec.kinds)})")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InvalidRequest(f"steps: expected an integer, got {steps!r}")
    if not 1 <= steps <= spec.max_steps:
        raise InvalidRequest(f"steps: {steps} is outside [1, {spec.max_steps}] for sampler {name!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise InvalidRequest(f"option {quote(unknown[0])}: not an option of sampler {name!r}; "
                             f"its options are {sorted(spec.options) or 'none'}")
    full = {key: opt.default for key, opt in spec.options.items()}
    full.update({key: spec.options[key].check(key, value) for key, value in options.items()})
    return spec, full


class CallCounter:
    """Counts network evaluations (samples in a batch count once per call, as papers count NFE), of
    denoisers and MeanFlow models (`network_call`) and of masked models (`logits_call`) alike; `rows`
    counts the samples the calls carried (masked and block-diffusion samplers call only the sequences still
    changing, so rows / batch is their mean NFE per sample)."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self.rows = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def network_call(self, *args) -> NetworkCall:  # (x, sigma, cond) or, for MeanFlow models, (z, r, t, cond)
        self.calls += 1
        self.rows += args[0].shape[0]
        return evaluate(self.model, *args)

    def __call__(self, *args):
        return self.network_call(*args).run()

    def logits_call(self, tokens: torch.Tensor, cond=None) -> NetworkCall:
        self.calls += 1
        self.rows += tokens.shape[0]
        return evaluate_logits(self.model, tokens, cond)

    def logits(self, tokens: torch.Tensor, cond=None) -> torch.Tensor:
        return self.logits_call(tokens, cond).run()

    def canvas_call(self, context, canvas: torch.Tensor, *rest) -> NetworkCall:  # block diffusion (canvas_logits)
        self.calls += 1
        self.rows += canvas.shape[0]
        return evaluate_canvas(self.model, context, canvas, *rest)


def check_inputs(model, x: torch.Tensor, sigmas: torch.Tensor) -> None:
    """Refuse NaN/Inf input and noise levels outside the model's valid range (never clamp silently)."""
    if not torch.isfinite(x).all():
        raise InvalidRequest("x: contains NaN or Inf")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise InvalidRequest("times: need at least two noise levels (one step)")
    if not torch.isfinite(sigmas).all():
        raise InvalidRequest("times: contain NaN or Inf")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise InvalidRequest("times: noise levels must strictly decrease")
    positive = sigmas[sigmas > 0]
    lo, hi = getattr(model, "sigma_min", 0.0), getattr(model, "sigma_max", math.inf)
    tol = 1e-6
    if len(positive) and (positive.max() > hi * (1 + tol) or positive.min() < lo * (1 - tol)):
        raise InvalidRequest(f"times: noise levels must lie in the model's range [{lo:.4g}, {hi:.4g}] "
                             f"(or be 0 at the end), got [{float(positive.min()):.4g}, "
                             f"{float(positive.max()):.4g}]")
    if (sigmas[:-1] <= 0).any():
        raise InvalidRequest("times: only the last noise level may be 0")


def run_sampler(name: str, model, x: torch.Tensor, sigmas: torch.Tensor, cond=None, *, noise=None,
                hook: Hook | None = None, options: dict[str, Any] | None = None, kind: str | None = None):
    """Validate, then run sampler `name`; returns (x, nfe). The hook's StepInfo carries the running NFE."""
    return drive(sampler_machine(name, model, x, sigmas, cond, noise=noise, hook=hook, options=options, kind=kind))


def sampler_machine(name: str, model, x: torch.Tensor, sigmas: torch.Tensor, cond=None, *, noise=None,
                    hook: Hook | None = None, options: dict[str, Any] | None = None, kind: str | None = None
                    ) -> StepMachine[tuple[torch.Tensor, int]]:
    """`run_sampler` as a step machine: validates, then yields the sampler's network calls; returns
    (x, nfe).  Validation happens on the first advance, before any call is yielded."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    spec, opts = validate(name, len(sigmas) - 1, options, kind)
    check_inputs(model, x, sigmas)
    if spec.stochastic and noise is None:
        raise InvalidRequest(f"sampler: {name!r} is stochastic and needs per-sample noise (seeds)")
    counter = CallCounter(model)
    counted_hook = None if hook is None else (lambda info: hook(replace(info, nfe=counter.calls)))
    out = yield from spec.machine(counter, x, sigmas, cond, noise=noise, hook=counted_hook, **opts)
    return out, counter.calls
