"""NFE budgets: a counting wrapper around the denoiser that enforces a search's budget exactly.

One NFE is one forward pass of the (guided) denoiser for one sample at one noise level, the unit every
test-time-scaling paper plots.  Classifier-free guidance counts as 1 NFE although it is two network
passes (the papers' convention: EvoSearch's 5000 = 100 x 50, RBF's 500 = 10 steps x 50); the raw network
passes, the verifier calls (never counted in NFE by any of the papers) and the wall time are reported
beside it.

A search call runs ``searches`` independent searches (one per seed) as the batch dimension; every search
in a call spends the same, so a model call's rows are split evenly and the budget is per search.
The charge happens before the network runs: a call that would overspend raises BudgetExceeded and
never reaches the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from samplers.calls import NetworkCall, evaluate
from samplers.denoiser import guidance_halves, paired_call
from samplers.errors import BudgetExceeded


@dataclass
class Budget:
    """Per-search NFE limit and the counters a SearchResult reports (all per search)."""

    limit: int
    searches: int = 1
    nfe: int = 0
    network_passes: int = 0
    verifier_calls: int = 0
    started: float = field(default_factory=time.perf_counter)

    def _per_search(self, rows: int, what: str) -> int:
        if rows % self.searches:
            raise RuntimeError(f"{what}: {rows} rows do not split evenly over {self.searches} searches")
        return rows // self.searches

    def charge(self, rows: int) -> None:
        """Spend rows / searches NFE per search, or raise BudgetExceeded without spending anything."""
        n = self._per_search(rows, "model call")
        if self.nfe + n > self.limit:
            raise BudgetExceeded(f"budget_nfe: spending {n} more NFE would exceed the budget of {self.limit} "
                                 f"({self.nfe} spent)")
        self.nfe += n

    def count_passes(self, rows: int) -> None:
        self.network_passes += self._per_search(rows, "network pass")

    def count_verifier(self, rows: int) -> None:
        self.verifier_calls += self._per_search(rows, "verifier call")

    @property
    def remaining(self) -> int:
        return self.limit - self.nfe

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class _PassCounter:
    """Counts raw network passes (samples per call) beneath any guidance wrapper."""

    def __init__(self, model, budget: Budget):
        self.model, self.budget = model, budget

    def __getattr__(self, name):
        return getattr(self.model, name)

    def network_call(self, x, sigma, cond=None) -> NetworkCall:
        self.budget.count_passes(x.shape[0])
        return evaluate(self.model, x, sigma, cond)


class CountedModel:
    """The denoiser a search sees: guided at `guidance`, charging NFE to `budget` before every call.

    ``evaluate(model, x, sigma, cond)`` is the (guided) data prediction, 1 NFE per row.  ``pair`` returns the
    conditional and unconditional predictions separately (FKC's guidance weights need both), also
    1 NFE per row: it is the same two passes classifier-free guidance makes.  ``experts`` evaluates the
    model under two labels (a product of experts), 2 NFE per row: two distinct predictions.
    """

    def __init__(self, model, budget: Budget, guidance: float | None = None):
        self.base = model
        self.budget = budget
        self.guidance = guidance
        self._passes = _PassCounter(model, budget)
        if guidance is not None and guidance != 1.0:
            from samplers.denoiser import with_guidance
            self._guided = with_guidance(self._passes, guidance)
        else:
            self._guided = self._passes

    def __getattr__(self, name):  # process, shape, sigma_min/max, num_classes, kind of the wrapped model
        return getattr(self.base, name)

    def network_call(self, x, sigma, cond=None) -> NetworkCall:
        self.budget.charge(x.shape[0])
        return evaluate(self._guided, x, sigma, cond)

    def __call__(self, x, sigma, cond=None):
        return self.network_call(x, sigma, cond).run()

    def pair(self, x, sigma, cond) -> NetworkCall:
        """The call of (D(x | cond), D(x | no class or negative prompt)) in one batched forward; 1 NFE per row."""
        return self._two(x, sigma, *guidance_halves(cond), x.shape[0])

    def experts(self, x, sigma, cond_a, cond_b) -> NetworkCall:
        """The call of (D(x | cond_a), D(x | cond_b)) in one batched forward; 2 NFE per row."""
        return self._two(x, sigma, cond_a, cond_b, 2 * x.shape[0])

    def _two(self, x, sigma, cond_a, cond_b, nfe: int) -> NetworkCall:
        self.budget.charge(nfe)
        return paired_call(self._passes, x, sigma, cond_a, cond_b)


def score_with(verifier, budget: Budget, x0: torch.Tensor, cond) -> torch.Tensor:
    """Rewards (float64, one per row) of `x0` under `verifier`, counting the verifier calls."""
    budget.count_verifier(x0.shape[0])
    with torch.no_grad():
        r = torch.as_tensor(verifier(x0, cond), dtype=torch.float64).reshape(-1)
    if r.shape[0] != x0.shape[0]:
        raise RuntimeError(f"verifier returned {r.shape[0]} rewards for {x0.shape[0]} samples")
    return torch.nan_to_num(r, nan=-torch.inf)
