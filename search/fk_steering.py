"""FK steering (Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of
Diffusion Models", arXiv 2501.06848): particles resampled by reward potentials along the trajectory."""

from __future__ import annotations

import torch

from samplers.calls import evaluate
from samplers.errors import InvalidRequest
from samplers.sde import ddpm_step

from .budget import CountedModel, score_with
from .core import Streams, Tracker, expand_cond
from .fkc import effective_sample_size
from .trajectory import initial_scale, schedule

POTENTIALS = ("max", "diff", "add", "rt")


def _multinomial(log_w: torch.Tensor, streams: Streams) -> torch.Tensor:
    """Multinomial resampling (with replacement) per search from its own selection generator."""
    probs = torch.softmax(log_w, 1)
    return torch.stack([torch.multinomial(probs[i], probs.shape[1], replacement=True, generator=streams.selection[i])
                        for i in range(probs.shape[0])])


def fk_steering(model: CountedModel, verifier, *, steps: int, cond, streams: Streams, tracker: Tracker,
                potential: str = "max", lam: float = 10.0, interval: int = 2, start: int = 1,
                adaptive: bool = False, particles: int = 0, grid: str = "uniform_lambda"):
    """K = budget // T particles per search run DDPM ancestral steps (DDIM eta = 1, the code's default);
    at steps start, start + interval, ... the Tweedie estimate x0_hat of every particle is scored and the
    particles are resampled multinomially with potential G: max: exp(lam max(r, r_prev_max)), add:
    exp(lam sum r), rt: exp(lam r), diff: exp(lam (r - r_prev)); at the end exp(lam r(x0)) divided by the
    product of the ancestors' earlier potentials, so that the product telescopes to exp(lam r(x0))
    (including the max-potential fix of PR #8).  `adaptive` resamples only when ESS < K / 2 and then, as
    issue #12 asks, accumulates log-weights between resamplings.  Returns the best final particle."""
    if potential not in POTENTIALS:
        raise InvalidRequest(f"search.options.potential: {potential!r} is not one of {list(POTENTIALS)}")
    budget = model.budget
    most = budget.remaining // steps
    k = particles or most
    if k < 1 or k > most:
        raise InvalidRequest(f"search.budget_nfe: {budget.limit} does not cover {max(k, 1)} particles x {steps} steps")
    g_n, shape = streams.searches, tuple(model.shape)
    c = expand_cond(cond, g_n, k)
    sigmas = schedule(model, steps, grid)
    x = streams.particles(k, "initial").randn(shape) * initial_scale(model)
    noise = streams.particles(k, "sde")
    zeros = torch.zeros(g_n, k, dtype=torch.float64)
    log_w, log_prod, r_prev, r_acc = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    for i in range(steps):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        x0 = yield evaluate(model, x, s, c)
        x = x0 if t == 0 else ddpm_step(x, x0, s, t, noise)
        final = i == steps - 1
        if not (final or (i >= start and (i - start) % interval == 0)):
            tracker.tick()
            continue
        r = score_with(verifier, budget, x0, c).reshape(g_n, k)
        tracker.offer(x0, r.reshape(-1), None)
        if final:
            log_g = lam * r - log_prod
        elif potential == "max":
            r_acc = torch.maximum(r, r_acc) if i > start else r
            log_g = lam * r_acc
        elif potential == "add":
            r_acc = r_acc + r
            log_g = lam * r_acc
        elif potential == "rt":
            log_g = lam * r
        else:
            log_g = lam * (r - r_prev)
            r_prev = r
        log_w = log_w + log_g
        log_prod = log_prod + (0 if final else log_g)
        need = effective_sample_size(log_w) < 0.5 * k if adaptive else torch.ones(g_n, dtype=torch.bool)
        if final or need.any():
            idx = _multinomial(log_w, streams)
            idx = torch.where(need[:, None] | final, idx, torch.arange(k).expand(g_n, k))
            rows = (idx + (torch.arange(g_n) * k)[:, None]).reshape(-1)
            x = x[rows]
            log_prod, r_prev, r_acc, r = (v.reshape(-1)[rows].reshape(g_n, k) for v in (log_prod, r_prev, r_acc, r))
            log_w = torch.where(need[:, None] | final, zeros, log_w)
    best = r.argmax(1) + torch.arange(g_n) * k
    tracker.report("final")
    return tracker.result(streams.seeds, samples=x[best], rewards=r.reshape(-1)[best])
