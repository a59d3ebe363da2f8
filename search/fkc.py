"""Feynman-Kac correctors with sequential Monte Carlo (Skreta et al. 2025, "Feynman-Kac Correctors in
Diffusion: Annealing, Guidance, and Product of Experts", arXiv 2503.02819, Props. 3.1-3.3).

Written in VE coordinates (x = x0 + kappa eps, the samplers' coordinates), where the forward SDE has no
drift (f = 0, so every divergence term of the paper vanishes) and sigma_t^2 = d kappa^2 / d tau = 2 kappa.
With s = (D(x, kappa) - x) / kappa^2 and a step from kappa to kappa' (d = kappa - kappa' > 0):
    x'  = x + 2 kappa eta S d + zeta sqrt(2 kappa d) z                    (Euler-Maruyama)
    cfg      (q_u^(1-b) q_c^b, Prop. 3.1):  S = (1-b) s_u + b s_c, eta = zeta = 1,
             dw = kappa b (b-1) |s_u - s_c|^2 d
    anneal   (q^b, Prop. 3.2):              S = s,
             dw = kappa b (b-1) |s|^2 d
    product  ((q1 q2)^b, Prop. 3.3):        S = s1 + s2,
             dw = [kappa b (b-1) |s1 + s2|^2 + 2 kappa b <s1, s2>] d
with eta = b, zeta = 1 for the target-score SDE (a = 0) or eta = (1+b)/2, zeta = 1/sqrt(b) for the
tempered-noise SDE (a = 1/2).  The |grad log q|^2 coefficient of Prop. 3.2 is b(b-1)/2 sigma^2 (the
reference notes' derivation and the authors' notebook; the extracted paper text drops a factor).
Then systematic resampling within each search (Douc & Cappe 2005) on the accumulated log-weights.
"""

from __future__ import annotations

import math

import torch

from samplers.calls import evaluate, step_machine
from samplers.errors import InvalidRequest

from .budget import CountedModel, score_with
from .core import Streams, Tracker, expand_cond, per_search
from .trajectory import initial_scale, schedule

TARGETS = ("cfg", "anneal", "product")


def systematic_resample(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices (G, K) drawn by systematic resampling of each row of log-weights (G, K), u ~ U[0,1) per row:
    positions (u + k) / K against the cumulative normalized weights."""
    g, k = log_w.shape
    cdf = torch.softmax(log_w, 1).cumsum(1)
    positions = (u.reshape(g, 1) + torch.arange(k, dtype=torch.float64)) / k
    return torch.searchsorted(cdf, positions, right=True).clamp_max(k - 1)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(log_w, 1)
    return 1.0 / (w**2).sum(1)


def exponential_step(x, score, s: float, s_next: float, eta: float, experts: int, zeta: float, z):
    """Exact step of dx = 2 kappa eta S dtau + zeta sqrt(2 kappa) dW (tau = -kappa) from s to s_next when
    the centre c = x + kappa^2 S / m (m experts; the mean of their denoisers) is held fixed over the step,
    so that 2 kappa eta S = (p / kappa)(c - x) with p = 2 eta m (an exponential integrator; for p = 2,
    zeta = 1 it is the DDPM ancestral step): x' = c + r^p (x - c) + zeta s_next sqrt((1 - r^(2p-2)) /
    (p - 1)) z with r = s_next / s."""
    p = 2 * eta * experts
    c = x + score * (s**2 / experts)
    r = s_next / s
    var = 2 * math.log(1 / r) if abs(p - 1) < 1e-12 else -math.expm1((2 * p - 2) * math.log(r)) / (p - 1)
    return c + r**p * (x - c) + zeta * s_next * math.sqrt(var) * z


def _sq(v: torch.Tensor) -> torch.Tensor:
    return v.double().flatten(1).pow(2).sum(1)


@step_machine
def fkc_particles(model: CountedModel, *, steps: int, cond, streams: Streams, particles: int, target: str = "cfg",
                  beta: float = 2.0, sde: str = "target_score", cond_b=None, grid: str = "karras",
                  ess_threshold: float = 1.0, clamp: float = 0.0, reweight: bool = True,
                  active_sigma: tuple[float, float] = (0.0, math.inf), discretization: str = "auto",
                  tick=None):
    """Run the weighted SDE for `target` with K = `particles` per search; returns (x (G*K, ...) at the
    model's sigma_min, log-weights (G, K) since the last resampling, number of resamplings).

    Resampling happens after a step when a search's ESS < ess_threshold * K (1.0: every step, the
    paper's scheme; 0: never), only while the step's sigma lies in `active_sigma` (the paper's active
    interval; the EDM2 code has none); weights reset to 0 after it.  Between resamplings log-weights
    accumulate.  `clamp` > 0 centres each step's increments and clips them to [-clamp, clamp] (the EDM2
    code's 1 or 2); 0 is the paper.  reweight=False runs the same SDE with no weights (the baseline).
    `discretization`: "euler_maruyama" (the EDM2 code's Euler SDE branch and the notebooks) or
    "exponential" (exact when the denoiser is held fixed over the step; for CFG it is the DDPM ancestral
    step, good at 10-20 steps, but for anneal / product targets its contraction rate 2 eta m / kappa
    overstates the true one and it converges slowly: the tests measured a 15% variance deficit at 400
    steps).  "auto" = exponential for cfg, Euler-Maruyama otherwise.  Either way the weight increment
    is the continuous-time rate at the step's start times the step."""
    if discretization == "auto":
        discretization = "exponential" if target == "cfg" else "euler_maruyama"
    if target not in TARGETS:
        raise InvalidRequest(f"search.options.target: {target!r} is not one of {list(TARGETS)}")
    if sde == "tempered_noise" and target == "cfg":
        raise InvalidRequest("search.options.sde: tempered_noise applies to anneal and product targets")
    g_n, k, shape = streams.searches, particles, tuple(model.shape)
    c = expand_cond(cond, g_n, k)
    cb = expand_cond(cond_b, g_n, k)
    if target == "cfg" and c is None:
        raise InvalidRequest("search.cond: fkc with target cfg needs a class label")
    if target == "product" and (c is None or cb is None):
        raise InvalidRequest("search.options.second_class: a product of experts needs two conditions (class labels, or "
                              "a prompt and second_prompt)")
    b = float(beta)
    eta, zeta = (b, 1.0) if sde == "target_score" else ((1 + b) / 2, 1 / math.sqrt(b))
    if target == "cfg":
        eta, zeta = 1.0, 1.0
    experts = 2 if target == "product" else 1
    sigmas = schedule(model, steps, grid, final_zero=False)
    # The initial noise of the target: N(0, kappa^2 / b) for q^b, N(0, kappa^2 / 2b) for (q1 q2)^b.
    init_std = initial_scale(model) / math.sqrt({"cfg": 1.0, "anneal": b, "product": 2 * b}[target])
    x = streams.particles(k, "initial").randn(shape) * init_std
    noise = streams.particles(k, "sde")
    log_w = torch.zeros(g_n, k, dtype=torch.float64)
    resamplings = 0
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = s - s_next
        if target == "cfg":
            d_c, d_u = yield model.pair(x, s, c)
            s_c, s_u = (d_c - x) / s**2, (d_u - x) / s**2
            drift = (1 - b) * s_u + b * s_c
            dw = s * b * (b - 1) * _sq(s_u - s_c) * d
        elif target == "anneal":
            sc = ((yield evaluate(model, x, s, c)) - x) / s**2
            drift = sc
            dw = s * b * (b - 1) * _sq(sc) * d
        else:
            d_a, d_b = yield model.experts(x, s, c, cb)
            s1, s2 = (d_a - x) / s**2, (d_b - x) / s**2
            drift = s1 + s2
            dw = (s * b * (b - 1) * _sq(s1 + s2) + 2 * s * b * (s1.double() * s2.double()).flatten(1).sum(1)) * d
        z = noise.randn_like(x)
        if discretization == "euler_maruyama":
            x = x + 2 * s * eta * drift * d + zeta * math.sqrt(2 * s * d) * z
        else:
            x = exponential_step(x, drift, s, s_next, eta, experts, zeta, z)
        active = active_sigma[0] <= s <= active_sigma[1]
        if reweight and active:
            dw = dw.reshape(g_n, k)
            if clamp > 0:
                dw = (dw - dw.mean(1, keepdim=True)).clamp(-clamp, clamp)
            log_w = log_w + dw
            need = effective_sample_size(log_w) < ess_threshold * k
            if need.any():
                idx = systematic_resample(log_w, streams.uniform())
                keep = torch.arange(k).expand(g_n, k)
                idx = torch.where(need[:, None], idx, keep) + (torch.arange(g_n) * k)[:, None]
                x = x[idx.reshape(-1)]
                log_w = torch.where(need[:, None], torch.zeros_like(log_w), log_w)
                resamplings += 1
        if tick is not None:
            tick()
    return x, log_w, resamplings


def fkc(model: CountedModel, verifier, *, steps: int, cond, streams: Streams, tracker: Tracker,
        target: str = "cfg", beta: float = 0.0, sde: str = "target_score", second_class: int = -1,
        second_prompt: str = "", second_cond=None, grid: str = "karras", ess_threshold: float = 1.0,
        clamp: float = 0.0, particles: int = 0,
        select: str = "first", reweight: bool = True, discretization: str = "auto"):
    """FKC as a search: K = budget // (T * NFE per step) particles per search (CFG counts 1 NFE per step,
    a product of experts 2), one returned sample per search.  `select`: "first" = particle 0 of the
    final resampled population (the EDM2 code: reward-free), "verifier" = its argmax under the verifier
    (K verifier calls).  beta = 0 takes the request's guidance scale for cfg.  The product's second expert
    is `second_class`, or `second_cond` (per-search conditioning the caller built, e.g. a text-to-image
    model's encoded `second_prompt`)."""
    if second_prompt and second_cond is None:
        raise InvalidRequest("search.options.second_prompt: this model takes no prompt; use second_class")
    budget = model.budget
    per_step = 2 if target == "product" else 1
    most = budget.remaining // (steps * per_step)
    k = particles or most
    if k < 1 or k > most:
        raise InvalidRequest(f"search.budget_nfe: {budget.limit} does not cover {max(k, 1)} particles x {steps} "
                             f"steps x {per_step} NFE")
    if target == "cfg":
        beta = beta or (model.guidance or 1.0)
    elif beta <= 0:
        raise InvalidRequest("search.options.beta: anneal and product targets need beta > 0")
    g_n, shape = streams.searches, tuple(model.shape)
    cond_b = second_cond if second_cond is not None else (
        None if second_class < 0 else torch.full((g_n,), second_class, dtype=torch.int64))
    # FKC-CFG evaluates the conditional and unconditional predictions itself (CountedModel.pair), so a
    # guidance scale on the request only supplies the default beta.
    x, log_w, resamplings = yield from fkc_particles.machine(
        model, steps=steps, cond=cond, streams=streams, particles=k, target=target, beta=beta, sde=sde, cond_b=cond_b,
        grid=grid, ess_threshold=ess_threshold, clamp=clamp, reweight=reweight, discretization=discretization,
        tick=tracker.tick)
    tracker.trace.append({"event": "particles", "particles": k, "resamplings": resamplings, "beta": beta})
    c = expand_cond(cond, g_n, k)
    if select == "verifier" and verifier is not None:
        r = score_with(verifier, budget, x, c)
        tracker.offer(x, r, "final particles")
        return tracker.result(streams.seeds)
    first = x.reshape(g_n, k, *shape)[:, 0]
    if verifier is not None:
        rewards = score_with(verifier, budget, first, per_search(cond, g_n))
    else:
        rewards = torch.full((g_n,), float("nan"), dtype=torch.float64)
    tracker.offer(first, rewards if verifier is not None else torch.zeros(g_n, dtype=torch.float64), "final")
    return tracker.result(streams.seeds, samples=first, rewards=rewards)
