"""Best-of-N for masked diffusion models (random search over the samplers' per-sample noise streams),
scored by a text verifier such as `text-words`."""

from __future__ import annotations

from samplers.errors import InvalidRequest
from samplers.masked import all_masked, masked_sampler_machine

from .budget import CountedModel, score_with
from .core import Streams, Tracker


def best_of_n_masked(model: CountedModel, verifier, *, steps: int, cond, streams: Streams, tracker: Tracker,
                     sampler: str = "first_hitting", length: int = 0, n: int = 0, batch: int = 64):
    """Draw N sequences with masked sampler `sampler` (first_hitting: exactly L NFE each; mdlm: at most
    min(steps, L)), keep the verifier's best.  N = budget // (NFE bound of one sequence).  Masked samplers
    call the network on the sequences that still change, so NFE is charged after each batch as the
    largest per-search sum (<= the bound, so the budget holds)."""
    budget = model.budget
    base = model.base
    length = length or base.length
    if length > base.length:
        raise InvalidRequest(f"search.options.length: {length} exceeds the model's length {base.length}")
    per = length if sampler == "first_hitting" else min(steps, length)
    n = n or budget.remaining // per
    if n < 1 or n * per > budget.remaining:
        raise InvalidRequest(f"search.budget_nfe: {budget.limit} does not cover {max(n, 1)} sequences of "
                             f"{per} NFE")
    g = streams.searches
    done = 0
    while done < n:
        k = min(batch, n - done)
        tokens = all_masked(base, g * k, length)
        labels = None if cond is None else list(cond.repeat_interleave(k).tolist())
        out, nfe = yield from masked_sampler_machine(sampler, base, tokens, cond=labels,
                                                     steps=None if sampler == "first_hitting" else steps,
                                                     noise=streams.particles(k, "masked"))
        spent = int(nfe.reshape(g, k).sum(1).max())
        budget.charge(g * spent)
        budget.count_passes(g * spent)
        tracker.offer(out, score_with(verifier, budget, out, None), f"candidates {done}-{done + k}")
        done += k
    return tracker.result(streams.seeds)
