"""Best-of-N for masked diffusion models (random search over the samplers' per-sample noise streams),
scored by a text verifier such as `text-words`."""

from __future__ import annotations

import torch

from samplers.errors import InvalidRequest
from samplers.masked import all_masked, check_tokens, masked_sampler_machine

from .budget import CountedModel, score_with
from .core import Streams, Tracker


def best_of_n_masked(model: CountedModel, verifier, *, steps: int, cond, streams: Streams, tracker: Tracker,
                     sampler: str = "first_hitting", length: int = 0, n: int = 0, batch: int = 64):
    """Draw N sequences with masked sampler `sampler`, keep the verifier's best.

    `cond`: None (every position generated, `length` of them) or ``{"tokens": (G, L)}``, each search's
    template: given ids kept, mask ids generated (a chat prompt followed by masks, or an infilling
    template).  The verifier scores a sequence from the template's first masked position on, so a prompt
    never earns reward.  N = budget // (NFE bound of one sequence: M masked positions for first_hitting,
    min(steps, M) for mdlm).  The model charges the budget by the rows of every call (pooled over the
    searches, since a masked sampler skips the sequences that did not change), so the budget holds by
    construction and the NFE reported is the mean per search."""
    base = model.base
    template = _template(base, cond, streams.searches, length)
    masks = int((template == base.mask_id).sum(1).max())
    start = int((template == base.mask_id).long().argmax(1).min())  # where the scored part begins
    per = masks if sampler == "first_hitting" else min(steps, masks)
    budget = model.budget
    n = n or budget.remaining // per
    if n < 1 or n * per > budget.remaining:
        raise InvalidRequest(f"search.budget_nfe: {budget.limit} does not cover {max(n, 1)} sequences of "
                             f"{per} NFE")
    tracker.shape = (template.shape[1],)  # the template's length, which need not be the model's
    done = 0
    while done < n:
        k = min(batch, n - done)
        tokens = template.repeat_interleave(k, dim=0)
        out, _ = yield from masked_sampler_machine(sampler, model, tokens, noise=streams.particles(k, "masked"),
                                                   steps=None if sampler == "first_hitting" else steps)
        tracker.offer(out, score_with(verifier, budget, out[:, start:], None), f"candidates {done}-{done + k}")
        done += k
    return tracker.result(streams.seeds)


def _template(base, cond, searches: int, length: int) -> torch.Tensor:
    """(G, L) token templates: all masks of `length` (0: the model's), or the given ones."""
    if cond is None:
        length = length or base.length
        if length > base.length:
            raise InvalidRequest(f"search.options.length: {length} exceeds the model's length {base.length}")
        return all_masked(base, searches, length)
    if not isinstance(cond, dict) or set(cond) != {"tokens"}:
        raise InvalidRequest("cond: a masked search takes None or {'tokens': (searches, length) token ids}")
    template = torch.as_tensor(cond["tokens"]).long()
    if length and length != template.shape[-1]:
        raise InvalidRequest(f"search.options.length: {length} differs from the prompt template's length "
                             f"{template.shape[-1]} (leave it 0)")
    check_tokens(base, template)
    return template
