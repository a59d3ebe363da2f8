"""Best-of-N: random search over initial noise (Ma et al. 2025, "Inference-Time Scaling for Diffusion
Models beyond Scaling Denoising Steps", Sec. 3.1 random search) -- the baseline of every paper here."""

from __future__ import annotations

from samplers.errors import InvalidRequest
from samplers.registry import REGISTRY

from .budget import CountedModel, score_with
from .core import Streams, Tracker, expand_cond
from .trajectory import initial_scale, rollout, sampler_nfe, schedule


def best_of_n(model: CountedModel, verifier, *, steps: int, cond, streams: Streams, tracker: Tracker,
              sampler: str = "dpmpp_2m", grid: str = "uniform_lambda", n: int = 0, batch: int = 64):
    """Draw N initial noises, solve each to x0 with `sampler` over `steps` steps, return the argmax of the
    verifier.  N = budget // NFE(sampler, steps) unless `n` > 0 asks for fewer; candidates run in
    batches of `batch` per search.  Cost N * T NFE and N verifier calls (Ma et al.'s accounting)."""
    budget = model.budget
    per = sampler_nfe(sampler, steps)
    most = budget.remaining // per
    if n > most:
        raise InvalidRequest(f"search.options.n: {n} candidates x {per} NFE exceed the budget of {budget.limit}")
    n = n or most
    if n < 1:
        raise InvalidRequest(f"search.budget_nfe: {budget.limit} is below one {sampler} sample of {steps} steps "
                             f"({per} NFE)")
    sigmas = schedule(model, steps, grid)
    g = streams.searches
    stochastic = REGISTRY[sampler].stochastic
    done = 0
    while done < n:
        k = min(batch, n - done)
        x = streams.particles(k, "initial").randn(model.shape) * initial_scale(model)
        noise = streams.particles(k, "sde") if stochastic else None
        x0 = yield from rollout.machine(sampler, model, x, sigmas, expand_cond(cond, g, k), noise, tracker.tick)
        tracker.offer(x0, score_with(verifier, budget, x0, expand_cond(cond, g, k)), f"candidates {done}-{done + k}")
        done += k
    return tracker.result(streams.seeds)
