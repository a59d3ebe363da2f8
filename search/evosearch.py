"""EvoSearch (He et al. 2025, "Scaling Image and Video Generation via Test-Time Evolutionary Search",
arXiv 2505.17618, Alg. 1 + Alg. 2): evolution over initial noise and intermediate SDE states."""

from __future__ import annotations

import math

import torch

from samplers.errors import InvalidRequest

from .budget import CountedModel, score_with
from .core import Streams, Tracker, expand_cond
from .trajectory import initial_scale, rollout, schedule, step_noise_std


def evo_nfe(schedule_steps: tuple[int, ...], populations: tuple[int, ...], steps: int) -> int:
    """NFE of an evolution schedule e_0 < ... < e_{n-1} with populations k_0..k_n (reference notes 1.6):
    k_0 e_0 + sum_g k_g (T - e_g) + sum_g k_{g+1} (e_{g+1} - e_g), e_n = T."""
    e = list(schedule_steps) + [steps]
    n = len(schedule_steps)
    return (populations[0] * e[0] + sum(populations[g] * (steps - e[g]) for g in range(n))
            + sum(populations[g + 1] * (e[g + 1] - e[g]) for g in range(n)))


def evo_plan(budget: int, steps: int, generations: int, initial_factor: float,
             evolution_steps: tuple[int, ...] = ()) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Evolution schedule and population sizes that fit `budget` NFE (reference notes 5.2): uniform
    e_g = floor(g T / n) unless given, k_start = initial_factor * k, k as large as fits, and the remainder
    absorbed by extra children in the last population.  Generations are dropped from the end until one
    child per generation fits; with none left it is best-of-N with the SDE sampler (the paper's
    reduction for an evolution schedule of {T})."""
    e = tuple(evolution_steps) or tuple(g * steps // generations for g in range(generations))
    while e:
        def cost(k, e=e):
            return evo_nfe(e, (max(1, math.ceil(initial_factor * k)),) + (k,) * len(e), steps)
        k = 1
        if cost(1) <= budget:
            while cost(k + 1) <= budget:
                k += 1
            pops = [max(1, math.ceil(initial_factor * k))] + [k] * len(e)
            pops[-1] += (budget - cost(k)) // (steps - e[-1])
            return e, tuple(pops)
        e = e[:-1]
    return (), (budget // steps,)


def _select(archive: torch.Tensor, rewards: torch.Tensor, k: int, elites: int, streams: Streams,
            keep_one_mutant: bool = True):
    """Elitism (top-m of the archive, unmutated) + tournament selection over floor(0.9 |archive|) random
    members per cycle for the other k - m; returns (children (G, k, ...), number of elites).  m <= k always
    (the code would keep all m elites and overspend the schedule); `keep_one_mutant` also leaves one mutant."""
    g, size = rewards.shape
    m = min(elites, k - 1) if k > 1 and keep_one_mutant else min(elites, k)
    m = min(m, size)
    top = rewards.topk(m, dim=1).indices
    b = max(1, int(size * 0.9))
    parents = torch.empty(g, k - m, dtype=torch.int64)
    for i in range(g):
        for c in range(k - m):
            sub = torch.randperm(size, generator=streams.selection[i])[:b]
            parents[i, c] = sub[rewards[i, sub].argmax()]
    idx = torch.cat([top, parents], 1)
    return archive[torch.arange(g)[:, None], idx], m


def _prior_std_at(model, sigma: float) -> float:
    """The initial noise's std in VE coordinates at level sigma: prior std (model coordinates) / alpha."""
    process = model.process
    t = process.t_of_kappa(torch.tensor(sigma, dtype=torch.float64))
    return process.prior_std() / float(process.alpha(t))


def evosearch(model: CountedModel, verifier, *, steps: int, cond, streams: Streams, tracker: Tracker,
              sampler: str = "ddpm", grid: str = "uniform_lambda", generations: int = 4,
              evolution_steps: tuple[int, ...] = (), initial_factor: float = 2.0, elites: int = 2,
              mutation_rate: float = 0.3, convention: str = "paper", sampler_options: dict | None = None):
    """EvoSearch with a stochastic `sampler` (DDIM eta = 1 = "ddpm" for diffusion, "dpmpp_2m_sde" for flows).

    Per generation g at step e_g: roll the population out to x0 (caching its states at every later e_g'
    into the archive of that generation), score the x0, keep the top `elites` of the archive of e_g
    unmutated and fill the rest by tournament selection over it, mutate, and continue the children to
    e_{g+1}.  Mutation: sqrt(1 - beta^2) x + beta eps on initial noise (keeps N(0, I)), x + sigma_t eps on
    intermediate states with sigma_t the sampler's own noise std on the step that produced the state.
    Returns the best x0 ever scored (the code's rule).

    `convention` picks where paper and official code differ.  "paper" (Alg. 2): states are cached *before*
    the denoise call at e_g, so a child is fed back at the noise level it was taken at; the initial-noise
    rule is used for states at step 0 only; at least one mutant per generation.  "code" (SD2.1/evo_pipe.py):
    the archive of e_g holds the *output* of step e_g, the children are fed back as the *input* of step
    e_g (one level cleaner than the model is told), generation 0 always takes the Gaussian-preserving rule
    (in model coordinates: beta eps / alpha of the state's level), later ones the std of step e_g, and
    all m elites are kept (m <= k).  Both: beta = 0.3 (paper; the code's default 0.2 via `mutation_rate`),
    tournament size floor(0.9 |archive|) (code; the paper says only b < k), the best x0 ever scored returned.
    On the exact mixture the two conventions give the same rewards within noise (docs/search.md)."""
    budget = model.budget
    sigmas = schedule(model, steps, grid)
    e, pops = evo_plan(budget.remaining, steps, generations, initial_factor, tuple(evolution_steps))
    if pops[0] < 1:
        raise InvalidRequest(f"search.budget_nfe: {budget.limit} is below one sample of {steps} steps")
    tracker.trace.append({"event": "plan", "evolution_steps": list(e), "populations": list(pops)})
    g_n, shape = streams.searches, tuple(model.shape)
    opts = dict(sampler_options or {})

    def run(x, lo, hi, k):
        c = expand_cond(cond, g_n, k)
        return (yield from rollout.machine(sampler, model, x, sigmas[lo:hi + 1], c, streams.particles(k, "sde"),
                                          tracker.tick, opts))

    def score(x0, k, event):
        r = score_with(verifier, budget, x0, expand_cond(cond, g_n, k))
        tracker.offer(x0, r, event)
        return r.reshape(g_n, k)

    k = pops[0]
    x = streams.particles(k, "initial").randn(shape) * initial_scale(model)
    ends = list(e) + [steps]
    if not e:  # no generation fits: best-of-N with the SDE sampler
        score((yield from run(x, 0, steps, k)), k, "best-of-n")
        return tracker.result(streams.seeds)
    code = convention == "code"
    x = yield from run(x, 0, e[0], k)
    archive = [[] for _ in e]  # per generation: the (G, k, ...) states cached at its evolution step
    rewards = [[] for _ in e]
    for g in range(len(e)):
        y, pos = x, e[g]
        for h in range(g, len(e)):  # roll out to x0, caching at every later evolution step
            mark = e[h] + 1 if code else e[h]  # code: the output of step e_h; paper: its input
            if mark > pos:
                y = yield from run(y, pos, mark, k)
            archive[h].append(y.reshape(g_n, k, *shape))
            pos = mark
        r = score((yield from run(y, pos, steps, k)), k, f"generation {g}")
        for h in range(g, len(e)):  # R[g'] stays index-aligned with P[g']
            rewards[h].append(r)
        children, m = _select(torch.cat(archive[g], 1), torch.cat(rewards[g], 1), pops[g + 1], elites, streams,
                              keep_one_mutant=not code)
        k = pops[g + 1]
        mutants = children[:, m:].reshape(-1, *shape)
        eps = streams.particles(k - m, "mutation").randn(shape) if k > m else torch.zeros_like(mutants)
        if (g == 0) if code else (e[g] == 0):  # Gaussian-preserving: sqrt(1 - beta^2) x + beta eps (eq. 7)
            scale = _prior_std_at(model, float(sigmas[e[g] + 1])) if code else initial_scale(model)
            mutants = math.sqrt(1 - mutation_rate**2) * mutants + mutation_rate * scale * eps
        else:  # x + sigma_t eps (eq. 8), sigma_t the sampler's noise std on the step that produced the state
            a = e[g] if code else e[g] - 1
            mutants = mutants + step_noise_std(sampler, float(sigmas[a]), float(sigmas[a + 1]), opts) * eps
        x = torch.cat([children[:, :m], mutants.reshape(g_n, k - m, *shape)], 1).reshape(-1, *shape)
        x = yield from run(x, e[g], ends[g + 1], k)
    score(x, k, "final population")
    return tracker.result(streams.seeds)
