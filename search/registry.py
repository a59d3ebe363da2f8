"""The search registry: name -> SearchSpec with typed, validated options, and the one entry point
`run_search` the server and the command line call.

    result = run_search("evosearch", model, verifier=build_verifier("digit-class", {}, resources),
                        budget_nfe=400, cond=torch.tensor([3, 3]), seeds=[0, 1], steps=10, guidance=2.0)

runs one independent search per seed (batched together) and returns a frozen SearchResult.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from samplers.calls import StepMachine, step_machine
from samplers.errors import InvalidRequest, quote
from samplers.grids import GRIDS
from samplers.noise import MAX_SEED
from samplers.registry import REGISTRY

from .best_of_n import best_of_n
from .budget import Budget, CountedModel
from .core import SearchHook, SearchResult, Streams, Tracker
from .evosearch import evosearch
from .fk_steering import POTENTIALS, fk_steering
from .fkc import TARGETS, fkc
from .masked import best_of_n_masked
from .options import SearchOption, check_options
from .rbf import rollover_budget_forcing

MAX_BUDGET_NFE = 1_000_000
MAX_SEARCHES = 256
DEFAULT_STEPS = 10  # steps per trajectory when a request leaves them unset
# stochastic image samplers with per-step noise (what EvoSearch mutates), from the sampler registry
SDE_SAMPLERS = tuple(sorted(n for n, s in REGISTRY.items()
                            if s.stochastic and s.step_noise is not None and "diffusion" in s.kinds))
ODE_SAMPLERS = tuple(sorted(n for n, s in REGISTRY.items() if not s.stochastic and "diffusion" in s.kinds))


@dataclass(frozen=True)
class SearchSpec:
    """Everything the server and the docs need to know about one search method."""

    name: str
    fn: Callable
    kinds: tuple[str, ...]
    needs_verifier: bool
    when_to_use: str
    options: dict[str, SearchOption] = field(default_factory=dict)
    kind_defaults: Callable[[str | None], dict[str, Any]] = lambda kind: {}  # options left empty, by model kind
    takes: tuple[str, ...] = ()  # extra inputs beyond the options (fkc: "second_cond", a second expert)


_GRID = SearchOption(str, "uniform_lambda", choices=tuple(sorted(GRIDS)), help="time grid of the trajectories")

SEARCHES: dict[str, SearchSpec] = {
    "best_of_n": SearchSpec(
        "best_of_n", best_of_n, ("diffusion", "flow"), True,
        "The baseline: N = budget / T independent samples, keep the verifier's best. Cheap on verifier calls.",
        {"sampler": SearchOption(str, "dpmpp_2m", choices=ODE_SAMPLERS + SDE_SAMPLERS, help="sampler per candidate"),
         "grid": _GRID,
         "n": SearchOption(int, 0, 0, 100_000, help="candidates; 0 = as many as the budget allows"),
         "batch": SearchOption(int, 64, 1, 4096, help="candidates per search evaluated together")}),
    "best_of_n_masked": SearchSpec(
        "best_of_n_masked", best_of_n_masked, ("masked",), True,
        "Best-of-N for masked text models: N sampled sequences, keep the text verifier's best.",
        {"sampler": SearchOption(str, "first_hitting", choices=("first_hitting", "mdlm"), help="masked sampler"),
         "length": SearchOption(int, 0, 0, 100_000, help="tokens to generate; 0 = the model's length"),
         "n": SearchOption(int, 0, 0, 100_000, help="sequences; 0 = as many as the budget allows"),
         "batch": SearchOption(int, 64, 1, 4096, help="sequences per search sampled together")}),
    "evosearch": SearchSpec(
        "evosearch", evosearch, ("diffusion", "flow"), True,
        "Evolution over initial noise and intermediate SDE states; best reward per NFE at large budgets, "
        "keeps diversity. Spends about 1.5x best-of-N's verifier calls.",
        {"sampler": SearchOption(str, "", choices=("",) + SDE_SAMPLERS,
                                 help="stochastic sampler; empty = ddpm (DDIM eta 1) for diffusion, "
                                      "dpmpp_2m_sde for flow models"),
         "grid": _GRID,
         "generations": SearchOption(int, 4, 1, 64, help="evolution steps, uniform over the trajectory"),
         "evolution_steps": SearchOption(list, (), 0, 10_000, item=int, max_items=64,
                                         help="explicit evolution step indices (increasing, first may be 0)"),
         "initial_factor": SearchOption(float, 2.0, 1.0, 16.0, help="k_start / k"),
         "elites": SearchOption(int, 2, 0, 1000, help="top archive members passed on unmutated"),
         "mutation_rate": SearchOption(float, 0.3, 0.0, 1.0, help="beta of the initial-noise mutation (paper "
                                                                  "0.3, code 0.2)"),
         "convention": SearchOption(str, "paper", choices=("paper", "code"),
                                    help="paper: Alg. 2 as written; code: the official code's archive level, "
                                         "generation-0 rule and elites")},
        kind_defaults=lambda kind: {"sampler": "dpmpp_2m_sde" if kind == "flow" else "ddpm"}),
    "rollover_budget_forcing": SearchSpec(
        "rollover_budget_forcing", rollover_budget_forcing, ("flow", "diffusion"), True,
        "RBF for flow models: greedy per-step search over the converted VP-SDE with rollover of unused "
        "per-step budget. One verifier call per NFE.",
        {"particles": SearchOption(int, 2, 1, 256, help="chains sharing the budget (code: 2)"),
         "init_fraction": SearchOption(float, 0.1, 0.0, 0.9, help="share of the budget spent on initial noises"),
         "interpolant": SearchOption(str, "linear", choices=("linear", "vp"),
                                     help="interpolant of the SDE (vp = the paper's conversion)"),
         "diffusion": SearchOption(str, "square", choices=("square", "linear", "zero"), help="g_s shape"),
         "diffusion_norm": SearchOption(float, 3.0, 0.0, 20.0, help="g_s = norm * s^2 for square"),
         "finish_steps": SearchOption(int, 3, 0, 100, help="ODE steps that finish the best chain; 0 = return "
                                                           "its Tweedie estimate (code)"),
         "time_schedule": SearchOption(str, "quadratic", choices=("quadratic", "exp", "lambda", "uniform"),
                                       help="time grid: the model's log-SNR grid, 1-(1-tau)^2 (paper), "
                                            "sqrt(1-(1-tau)^2) (code)")}),
    "fkc": SearchSpec(
        "fkc", fkc, ("diffusion", "flow"), False,
        "Feynman-Kac correctors: SMC over weighted SDEs for CFG as a geometric average, temperature "
        "annealing or a product of two classes. Reward-free.",
        {"target": SearchOption(str, "cfg", choices=TARGETS, help="what the particles target"),
         "beta": SearchOption(float, 0.0, 0.0, 100.0, help="guidance weight (cfg; 0 = the request's "
                                                           "guidance) or inverse temperature"),
         "sde": SearchOption(str, "target_score", choices=("target_score", "tempered_noise"), help="SDE family"),
         "second_class": SearchOption(int, -1, -1, 100_000, help="second expert's class for target product"),
         "second_prompt": SearchOption(str, "", help="second expert's prompt for target product "
                                                              "(text-to-image models)"),
         "grid": SearchOption(str, "karras", choices=tuple(sorted(GRIDS)), help="time grid"),
         "ess_threshold": SearchOption(float, 1.0, 0.0, 1.0, help="resample when ESS < threshold * K"),
         "clamp": SearchOption(float, 0.0, 0.0, 100.0, help="centre and clip log-weight increments; 0 = off"),
         "particles": SearchOption(int, 0, 0, 100_000, help="K; 0 = budget / (T * NFE per step)"),
         "select": SearchOption(str, "first", choices=("first", "verifier"), help="which particle to return"),
         "reweight": SearchOption(bool, True, help="false = the same SDE without weights (baseline)"),
         "discretization": SearchOption(str, "auto", choices=("auto", "exponential", "euler_maruyama"),
                                        help="SDE step; auto = exponential (DDPM) for cfg, else Euler-Maruyama")},
        takes=("second_cond",)),
    "fk_steering": SearchSpec(
        "fk_steering", fk_steering, ("diffusion", "flow"), True,
        "FK steering: particles resampled by reward potentials on their Tweedie estimates (the 'particle "
        "sampling' baseline of EvoSearch). K verifier calls per resampling step.",
        {"potential": SearchOption(str, "max", choices=POTENTIALS, help="potential (max: EvoSearch's baseline)"),
         "lam": SearchOption(float, 10.0, 0.0, 1000.0, help="lambda: exp(lambda r) tilt"),
         "interval": SearchOption(int, 2, 1, 1000, help="steps between resamplings"),
         "start": SearchOption(int, 1, 0, 1000, help="first resampling step"),
         "adaptive": SearchOption(bool, False, help="resample only when ESS < K / 2"),
         "particles": SearchOption(int, 0, 0, 100_000, help="K; 0 = budget / T"),
         "grid": _GRID}),
}


def validate_search(method: str, budget_nfe: int, options: dict[str, Any] | None = None, kind: str | None = None,
                    steps: int = 10) -> tuple[SearchSpec, dict[str, Any]]:
    """Check a search request; return the spec and the full option dict with defaults filled in."""
    if not method:
        raise InvalidRequest("search.method: name is empty")
    if method not in SEARCHES:
        raise InvalidRequest(f"search.method: unknown search {quote(method)}; available: {', '.join(sorted(SEARCHES))}")
    spec = SEARCHES[method]
    if kind is not None and kind not in spec.kinds:
        raise InvalidRequest(f"search.method: {method!r} does not apply to {kind} models "
                             f"(it serves {list(spec.kinds)})")
    if isinstance(budget_nfe, bool) or not isinstance(budget_nfe, int) or not 1 <= budget_nfe <= MAX_BUDGET_NFE:
        raise InvalidRequest(f"search.budget_nfe: expected an integer in [1, {MAX_BUDGET_NFE}], got {budget_nfe!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InvalidRequest(f"steps: expected an integer in [1, 1000], got {steps!r}")
    opts = check_options(spec.options, options, f"search {method!r}", "search.options")
    e = opts.get("evolution_steps", ())
    if e and (list(e) != sorted(set(e)) or e[-1] >= steps):
        raise InvalidRequest(f"search.options.evolution_steps: must be strictly increasing and below steps ({steps})")
    return spec, opts


@step_machine
def run_search(method: str, model, *, verifier, budget_nfe: int, cond=None, seeds: Sequence[int],
               steps: int | None = DEFAULT_STEPS,
               guidance: float | None = None, options: dict[str, Any] | None = None,
               hook: SearchHook | None = None, kind: str | None = None, trace: bool = True,
               second_cond=None) -> StepMachine[SearchResult]:
    """Run search `method` once per seed (batched), each with `budget_nfe` NFE, on `model` (a Denoiser in
    VE coordinates, guided at `guidance` with CFG counted as 1 NFE), `steps` (None = 10) per trajectory.
    `cond`: class labels, one per seed, or a latent pipeline's dict of per-seed tensors (or None);
    `second_cond` the same for a second expert (fkc's product of two prompts).  The hook receives
    SearchProgress with the best-so-far of every search; it may raise Cancelled / DeadlineExceeded to
    stop.  A model call that would exceed the budget raises BudgetExceeded (a bug in a method, never a
    user error).  `run_search.machine` is the same search as a step machine (samplers/calls.py), which
    the engine advances one network call at a time; validation happens on its first advance."""
    kind = kind or getattr(model, "kind", None)
    steps = DEFAULT_STEPS if steps is None else steps
    spec, opts = validate_search(method, budget_nfe, options, kind, steps)
    seeds = [int(s) for s in seeds]
    if not 1 <= len(seeds) <= MAX_SEARCHES:
        raise InvalidRequest(f"seeds: expected 1 to {MAX_SEARCHES} seeds, got {len(seeds)}")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise InvalidRequest("seeds: each seed must lie in [0, 2^63 - 1]")
    if spec.needs_verifier and verifier is None:
        raise InvalidRequest(f"search.verifier: {method!r} needs a verifier")
    cond = _per_seed(cond, len(seeds), "cond")
    second_cond = _per_seed(second_cond, len(seeds), "second_cond")
    if second_cond is not None and "second_cond" not in spec.takes:
        raise InvalidRequest(f"second_cond: search {method!r} takes no second condition")
    if guidance is not None and not 0.0 <= float(guidance) <= 100.0:
        raise InvalidRequest(f"guidance: {guidance} is outside [0, 100]")
    opts = {**opts, **{k: v for k, v in spec.kind_defaults(kind).items() if not opts.get(k)}}
    budget = Budget(budget_nfe, len(seeds))
    counted = CountedModel(model, budget, None if guidance is None else float(guidance))
    shape = getattr(model, "shape", None) or (opts.get("length") or model.length,)
    tracker = Tracker(method, budget, hook, shape, keep_trace=trace)
    extra = {} if second_cond is None else {"second_cond": second_cond}
    return (yield from spec.fn(counted, verifier, steps=steps, cond=cond, streams=Streams(seeds), tracker=tracker,
                               **opts, **extra))


def _per_seed(cond, searches: int, name: str):
    """Class labels as an int64 (G,) tensor, or a dict cond whose every entry has G rows; None stays None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        rows = {int(v.shape[0]) for v in cond.values()}
        if rows != {searches}:
            raise InvalidRequest(f"{name}: expected {searches} rows (one per seed) in every entry, got {sorted(rows)}")
        return cond
    cond = torch.as_tensor(cond, dtype=torch.int64).reshape(-1)
    if cond.shape[0] != searches:
        raise InvalidRequest(f"{name}: expected one class label per seed ({searches}), got {cond.shape[0]}")
    return cond


def _describe_options(options: dict[str, SearchOption]) -> dict[str, dict]:
    return {k: {"type": o.type.__name__ if o.type is not list else f"list[{o.item.__name__}]",
                "default": list(o.default) if isinstance(o.default, tuple) else o.default,
                "minimum": o.minimum, "maximum": o.maximum,
                "choices": None if o.choices is None else list(o.choices), "help": o.help}
            for k, o in options.items()}


def catalog() -> dict[str, list[dict]]:
    """JSON-able description of every search method and verifier (for ListSearches / `--help` output)."""
    from .verifiers import VERIFIERS

    return {"searches": [{"name": s.name, "kinds": list(s.kinds), "needs_verifier": s.needs_verifier,
                          "when_to_use": s.when_to_use, "options": _describe_options(s.options)}
                         for s in SEARCHES.values()],
            "verifiers": [{"name": v.name, "kinds": list(v.kinds), "resources": list(v.resources),
                           "needs_cond": v.needs_cond, "held_out": v.held_out, "when_to_use": v.when_to_use,
                           "options": _describe_options(v.options)} for v in VERIFIERS.values()]}
