"""What every search shares: the frozen result, the progress a hook sees, per-search random streams and
the best-so-far tracker.

Layout: a call runs G independent searches, one per seed, as the batch dimension.  Tensors of particles
are (G * K, *shape), search-major (rows g*K .. g*K + K - 1 belong to search g).  Every random number of
search g comes from streams derived from seed g alone, so a search gives the same result alone or
batched with others.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from samplers.noise import SampleNoise

from .budget import Budget


@dataclass(frozen=True)
class SearchResult:
    """One returned sample per seed, with its reward and what the search cost (counters are per search)."""

    samples: torch.Tensor  # (G, *shape)
    rewards: torch.Tensor  # (G,) float64: the verifier's reward of each returned sample (NaN if never scored)
    seeds: tuple[int, ...]
    nfe: int
    verifier_calls: int
    network_passes: int
    seconds: float
    trace: tuple[dict, ...] = ()


@dataclass(frozen=True)
class SearchProgress:
    """What a search reports to its hook: spend so far and the best sample found so far, per search."""

    method: str
    nfe: int
    budget_nfe: int
    verifier_calls: int
    network_passes: int
    seconds: float
    best_rewards: torch.Tensor | None  # (G,) or None while nothing has been scored
    best_x0: torch.Tensor | None  # (G, *shape)


SearchHook = Callable[[SearchProgress], None]


def derive_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed for (purpose, index) of the search seeded `seed` (numpy SeedSequence spawn keys)."""
    key = (zlib.crc32(purpose.encode()), int(index))
    return int(np.random.SeedSequence(int(seed), spawn_key=key).generate_state(1, np.uint64)[0]) & (2**63 - 1)


class Streams:
    """Per-search randomness: particle noise streams and one generator per search for selection draws."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = tuple(int(s) for s in seeds)
        self.selection = [torch.Generator().manual_seed(derive_seed(s, "selection")) for s in self.seeds]
        self._count: dict[str, int] = {}

    @property
    def searches(self) -> int:
        return len(self.seeds)

    def particles(self, k: int, purpose: str = "particles", dtype=torch.float32) -> SampleNoise:
        """k noise streams per search (G * k in search-major order) for `purpose`; each call gets fresh
        streams (the n-th call with the same purpose uses index n)."""
        n = self._count.get(purpose, 0)
        self._count[purpose] = n + 1
        return SampleNoise([derive_seed(s, f"{purpose}/{n}", j) for s in self.seeds for j in range(k)], dtype)

    def uniform(self) -> torch.Tensor:
        """One U[0, 1) draw per search."""
        return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.selection])


def expand_cond(cond, searches: int, k: int):
    """Per-search conditioning -> per-particle (G * k rows, search-major), or None.  `cond` is class labels
    (G,) or a latent pipeline's dict of per-search tensors (G, ...) (models/pipelines)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {key: value.repeat_interleave(k, dim=0) for key, value in cond.items()}
    return torch.as_tensor(cond).reshape(searches).repeat_interleave(k)


def per_search(cond, searches: int):
    """The conditioning of one particle per search (G rows), as a search returns its samples."""
    if cond is None or isinstance(cond, dict):
        return cond
    return torch.as_tensor(cond).reshape(searches)


class Tracker:
    """Best-so-far per search over everything scored; streams it to the hook and keeps the trace."""

    def __init__(self, method: str, budget: Budget, hook: SearchHook | None, shape, keep_trace: bool = True):
        self.method, self.budget, self.hook = method, budget, hook
        g = budget.searches
        self.best_rewards = torch.full((g,), -torch.inf, dtype=torch.float64)
        self.best_x0: torch.Tensor | None = None
        self.shape = tuple(shape)
        self.keep_trace = keep_trace
        self.trace: list[dict] = []

    def offer(self, x0: torch.Tensor, rewards: torch.Tensor, event: str = "") -> None:
        """Offer (G * k) scored candidates; keep each search's best, then report."""
        g = self.budget.searches
        r = rewards.reshape(g, -1)
        top, idx = r.max(1)
        cand = x0.reshape(g, -1, *self.shape)[torch.arange(g), idx]
        if self.best_x0 is None:
            self.best_x0 = cand.clone()
        better = top > self.best_rewards
        self.best_rewards = torch.where(better, top, self.best_rewards)
        self.best_x0 = torch.where(better.reshape(-1, *[1] * len(self.shape)), cand, self.best_x0)
        self.report(event)

    def tick(self, info=None) -> None:
        """Report without a trace entry (used as a per-step sampler hook, so cancellation is prompt)."""
        self.report(None)

    def report(self, event: str | None = "") -> None:
        if self.keep_trace and event is not None:
            self.trace.append({"event": event, "nfe": self.budget.nfe, "verifier_calls": self.budget.verifier_calls,
                               "best_reward": [float(v) for v in self.best_rewards]})
        if self.hook is not None:
            scored = bool(torch.isfinite(self.best_rewards).any())
            self.hook(SearchProgress(self.method, self.budget.nfe, self.budget.limit, self.budget.verifier_calls,
                                     self.budget.network_passes, self.budget.seconds,
                                     self.best_rewards.clone() if scored else None,
                                     None if self.best_x0 is None else self.best_x0.clone()))

    def result(self, seeds: Sequence[int], samples: torch.Tensor | None = None,
               rewards: torch.Tensor | None = None) -> SearchResult:
        """The frozen result: the best-so-far, unless the method returns its own samples/rewards."""
        samples = self.best_x0 if samples is None else samples
        rewards = self.best_rewards if rewards is None else rewards
        rewards = torch.where(torch.isfinite(rewards), rewards, torch.full_like(rewards, float("nan")))
        return SearchResult(samples, rewards, tuple(int(s) for s in seeds), self.budget.nfe,
                            self.budget.verifier_calls, self.budget.network_passes, self.budget.seconds,
                            tuple(self.trace))
