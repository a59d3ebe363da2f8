"""Block diffusion sampling for BD3-LM (Arriola et al. 2025, arXiv 2503.09573, Alg. 2): blocks left to right.

A BD3-LM network attends block-causally, and it was trained to denoise block b given the clean blocks
before it. So sampling unmasks block after block: block b is sampled by a masked sampler over the sequence
cut after block b (earlier blocks done, later blocks not yet there), which is exactly what BD3-LM's
KV-cached sampler computes. Inside a block, `block_first_hitting` runs FHS (one token per network call,
exact; BD3-LM's `first_hitting` option) and `block_mdlm` runs the MDLM ancestral sampler with
steps / num_blocks steps per block (BD3-LM's `ddpm_cache` predictor). Per-sample noise streams are used in
block order, so sample k depends only on seed k. The model must carry `block_size`; a model without one
(MDLM) is one block, and these samplers reduce to `first_hitting` / `mdlm`.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidRequest
from .hooks import Hook, report
from .masked import SAMPLING_OPTIONS, _take
from .noise import SampleNoise
from .registry import Option, get_spec, register


def blockwise(model, tokens: torch.Tensor, cond: Any, inner: str, *, noise: SampleNoise, hook: Hook | None,
              steps: int | None = None, **options):
    """Run masked sampler `inner` (a step machine) on each block in turn; returns the tokens."""
    x = tokens.clone()
    batch, length = x.shape
    size = getattr(model, "block_size", None) or length
    blocks = -(-length // size)
    if steps is not None and steps % blocks:
        raise InvalidRequest(f"steps: {steps} is not a multiple of the number of blocks ({blocks})")
    machine = get_spec(inner).machine
    for b in range(blocks):
        hi = min(length, (b + 1) * size)
        rows = (x[:, b * size:hi] == model.mask_id).any(1).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        extra = {} if steps is None else {"steps": steps // blocks}
        out = yield from machine(model, x[rows, :hi], _take(cond, rows), noise=noise.subset(rows.tolist()),
                                       hook=None, **extra, **options)
        x[rows, :hi] = out
        if hook is not None:
            report(hook, b, blocks, 1 - b / blocks, 1 - (b + 1) / blocks, x.clone(), x.clone())
    return x


@register("block_first_hitting", kinds=("masked",), nfe_per_step=1, order=1, stochastic=True, one_step_per_mask=True,
          max_steps=1_000_000, options=dict(SAMPLING_OPTIONS),
          when_to_use="BD3-LM (block-causal) models: FHS inside each block, blocks left to right")
def block_first_hitting(model, tokens: torch.Tensor, cond: Any = None, *, noise: SampleNoise,
                        hook: Hook | None = None, **options):
    """FHS per block, blocks in order (arXiv 2503.09573 Alg. 2 with arXiv 2409.02908 Alg. 1 inside)."""
    return (yield from blockwise(model, tokens, cond, "first_hitting", noise=noise, hook=hook, **options))


@register("block_mdlm", kinds=("masked",), nfe_per_step=1, order=1, stochastic=True, max_steps=100_000,
          options={**SAMPLING_OPTIONS,
                   "cached": Option(bool, True, help="skip the network when a sequence did not change"),
                   "final": Option(str, "ancestral", choices=("ancestral", "greedy"),
                                   help="last step of a block: sample the remaining masks, or the argmax")},
          when_to_use="BD3-LM (block-causal) models: MDLM ancestral steps inside each block (steps in total, "
                      "split evenly over the blocks)")
def block_mdlm(model, tokens: torch.Tensor, cond: Any = None, *, steps: int, noise: SampleNoise,
               hook: Hook | None = None, **options):
    """MDLM ancestral sampling per block, blocks in order (arXiv 2503.09573 Alg. 2)."""
    return (yield from blockwise(model, tokens, cond, "mdlm", noise=noise, hook=hook, steps=steps, **options))
