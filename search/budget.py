"""NFE budgets: a counting wrapper around the denoiser that enforces a search's budget exactly.

One NFE is one forward pass of the (guided) denoiser for one sample at one noise level, the unit every
test-time-scaling paper plots.  Classifier-free guidance counts as 1 NFE although it is two network
passes (the papers' convention: EvoSearch's 5000 = 100 x 50, RBF's 500 = 10 steps x 50); the raw network
passes, the verifier calls (never counted in NFE by any of the papers) and the wall time are reported
beside it.

A search call runs ``searches`` independent searches (one per seed) as the batch dimension; every search
in a call spends the same, so a model call's rows are split evenly and the budget is per search.
Masked samplers are the exception: they call the network only on the sequences still changing, so the
searches of one call spend unevenly; their rows are pooled and NFE per search is the mean (rounded up).
The charge happens before the network runs: a call that would overspend raises BudgetExceeded and
never reaches the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from samplers.calls import NetworkCall, evaluate, evaluate_logits
from samplers.denoiser import Unclipped, guidance_halves, paired_call
from samplers.errors import BudgetExceeded


@dataclass
class Budget:
    """Per-search NFE limit and the counters a SearchResult reports (all per search)."""

    limit: int
    searches: int = 1
    nfe: int = 0
    network_passes: int = 0
    verifier_calls: int = 0
    rows: int = 0  # NFE rows charged, all searches together
    started: float = field(default_factory=time.perf_counter)

    def _per_search(self, rows: int, what: str) -> int:
        if rows % self.searches:
            raise RuntimeError(f"{what}: {rows} rows do not split evenly over {self.searches} searches")
        return rows // self.searches

    def charge(self, rows: int) -> None:
        """Spend rows / searches NFE per search, or raise BudgetExceeded without spending anything."""
        self._per_search(rows, "model call")
        self.charge_pooled(rows)

    def charge_pooled(self, rows: int) -> None:
        """Spend `rows` that need not split evenly over the searches (a masked sampler's call): NFE per search
        becomes ceil(all rows / searches); raise BudgetExceeded without spending anything past the limit."""
        nfe = -(-(self.rows + rows) // self.searches)
        if nfe > self.limit:
            raise BudgetExceeded(f"budget_nfe: spending {nfe - self.nfe} more NFE would exceed the budget of "
                                 f"{self.limit} ({self.nfe} spent)")
        self.rows += rows
        self.nfe = nfe

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
    """Counts raw network passes (samples per call, `per_row` per sample) beneath any guidance wrapper."""

    def __init__(self, model, budget: Budget, per_row: int = 1):
        self.model, self.budget, self.per_row = model, budget, per_row

    def __getattr__(self, name):
        return getattr(self.model, name)

    def network_call(self, x, sigma, cond=None) -> NetworkCall:
        self.budget.count_passes(self.per_row * x.shape[0])
        return evaluate(self.model, x, sigma, cond)

    def prediction_call(self, x, sigma, cond=None) -> NetworkCall:  # before a data clip (guidance clips after)
        self.budget.count_passes(self.per_row * x.shape[0])
        return Unclipped(self.model).network_call(x, sigma, cond)


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
        own_guidance = getattr(model, "guided", None)  # a latent pipeline guides as its own pipeline does
        if guidance is None or guidance == 1.0:
            self._guided = self._passes
        elif own_guidance is not None:
            self._guided = _PassCounter(own_guidance(guidance), budget, per_row=2)
        else:
            from samplers.denoiser import with_guidance
            self._guided = with_guidance(self._passes, guidance)

    def __getattr__(self, name):  # process, shape, sigma_min/max, num_classes, kind of the wrapped model
        return getattr(self.base, name)

    def network_call(self, x, sigma, cond=None) -> NetworkCall:
        self.budget.charge(x.shape[0])
        return evaluate(self._guided, x, sigma, cond)

    def __call__(self, x, sigma, cond=None):
        return self.network_call(x, sigma, cond).run()

    def logits_call(self, tokens, cond=None) -> NetworkCall:
        """A masked model's call (samplers/masked.py), charged by its rows, pooled over the searches (1 NFE and
        1 network pass per row: masked models take no classifier-free guidance here)."""
        self.budget.charge_pooled(tokens.shape[0])
        self.budget.network_passes = self.budget.nfe
        return evaluate_logits(self.base, tokens, cond)

    def logits(self, tokens, cond=None):
        return self.logits_call(tokens, cond).run()

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
