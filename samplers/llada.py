"""LLaDA's sampler: semi-autoregressive low-confidence remasking (Nie et al. 2025, arXiv 2502.09992, Sec. 2.4, App. B).

The answer region (every masked position; they must form one suffix after the prompt) is cut into blocks
of `block_length` decoded left to right; each block gets steps / num_blocks steps. At each step the
network predicts every position, a token x0 is drawn for each masked one (argmax at temperature 0,
otherwise Gumbel-max), and of the block's masked positions the k most confident (probability of the
drawn token; `llada_random`: uniform scores) are committed, the rest stay masked ("remasked"). k follows
the linear schedule: the block's n masks spread evenly over its steps, the remainder going to the first
steps. Classifier-free guidance (LLaDA's App. B.3): the unconditional input masks the whole prompt, the
two are one batched call, and the logits are u + (w + 1)(c - u).

Contract as in samplers/masked.py: ``machine(model, tokens, cond=None, *, steps, noise, hook=None,
**options) -> tokens``, a step machine (samplers/calls.py). Randomness: per step, sample k draws
`block_length x V` uniforms from its own stream for the Gumbel noise (only when temperature > 0), then,
for `llada_random`, `block_length` uniforms for the scores; positions outside the active block never need
any (they are either committed or not yet eligible). Draws are in float64, as LLaDA's own code does
(citing arXiv 2409.02908). Ids in `model.forbidden` (at least the mask) are never drawn.
"""

from __future__ import annotations

from typing import Any

import torch

from .calls import NetworkCall
from .errors import InvalidRequest
from .hooks import Hook, report
from .noise import SampleNoise
from .registry import Option, register

LLADA_OPTIONS = {
    "block_length": Option(int, 32, minimum=1, maximum=1_000_000,
                           help="semi-autoregressive block; the answer length must be a multiple of it"),
    "cfg_scale": Option(float, 0.0, minimum=0.0, maximum=100.0,
                        help="LLaDA's guidance w: u + (w + 1)(c - u), unconditional = prompt masked; 0: off"),
    "temperature": Option(float, 0.0, minimum=0.0, maximum=10.0,
                          help="Gumbel-max temperature of the proposals; 0: argmax (LLaDA's default)"),
}


def logits_call(model, x: torch.Tensor, cond: Any) -> NetworkCall:
    """The network call of model.logits(x, cond) (split by the model's `logits_call` when it has one)."""
    split = getattr(model, "logits_call", None)
    return split(x, cond) if split is not None else NetworkCall(model.logits, (x, cond))


def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to commit per step: n // steps each, the first n % steps steps one more."""
    n = masked.sum(1, keepdim=True)
    extra = torch.arange(steps)[None, :] < (n % steps)
    return n // steps + extra.long()


def answer_start(model, tokens: torch.Tensor) -> int:
    """Where the masked answer begins; every row must be prompt followed by an all-masked answer."""
    masked = tokens == model.mask_id
    start = int(masked.long().argmax(1)[0])
    if not (masked[:, start:].all() and not masked[:, :start].any()):
        raise InvalidRequest("tokens: LLaDA sampling needs every sequence to be a prompt followed by an "
                             "all-masked answer of the same length (batch different lengths separately)")
    return start


def _twice(cond: Any) -> Any:
    if cond is None:
        return None
    return torch.cat([cond, cond]) if isinstance(cond, torch.Tensor) else list(cond) + list(cond)


def _guided_logits(model, x, cond, prompt, cfg_scale):
    """One network call; with guidance the batch is [x, x with the prompt masked], combined per LLaDA."""
    if cfg_scale == 0:
        return (yield logits_call(model, x, cond))
    both = yield logits_call(model, torch.cat([x, x.masked_fill(prompt, model.mask_id)]), _twice(cond))
    c, u = both.chunk(2)
    return u + (cfg_scale + 1) * (c - u)


def semi_autoregressive(model, tokens, cond, *, steps: int, noise: SampleNoise, hook: Hook | None,
                        block_length: int, cfg_scale: float, temperature: float, random_scores: bool):
    """The shared loop of `llada` and `llada_random` (they differ only in the confidence scores)."""
    x = tokens.clone()
    batch, length = x.shape
    start = answer_start(model, x)
    if (length - start) % block_length:
        raise InvalidRequest(f"options: the answer length {length - start} is not a multiple of block_length "
                             f"{block_length}")
    blocks = (length - start) // block_length
    if steps % blocks:
        raise InvalidRequest(f"steps: {steps} is not a multiple of the number of blocks ({blocks})")
    per_block = steps // blocks
    prompt = x != model.mask_id
    forbidden = torch.tensor(model.forbidden, dtype=torch.long)
    for b in range(blocks):
        lo, hi = start + b * block_length, start + (b + 1) * block_length
        counts = transfer_counts(x[:, lo:hi] == model.mask_id, per_block)
        for i in range(per_block):
            logits = yield from _guided_logits(model, x, cond, prompt, cfg_scale)
            z = logits[:, lo:hi].double().index_fill_(-1, forbidden, -torch.inf)
            if temperature > 0:  # Gumbel-max: argmax z - T log(-log u) = LLaDA's argmax exp(z) / (-log u)^T
                x0 = (z - temperature * torch.log(-torch.log(noise.rand((block_length, z.shape[-1]))))).argmax(-1)
            else:
                x0 = z.argmax(-1)
            if random_scores:
                score = noise.rand((block_length,))
            else:
                score = torch.softmax(z, -1).gather(-1, x0[..., None])[..., 0]
            masked = x[:, lo:hi] == model.mask_id
            score = score.masked_fill(~masked, -torch.inf)
            rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
            commit = rank < counts[:, i:i + 1]
            x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
            if hook is not None:
                x0_hat = torch.where(x == model.mask_id, logits.index_fill(-1, forbidden, -torch.inf).argmax(-1), x)
                done = b * per_block + i
                report(hook, done, steps, 1 - done / steps, 1 - (done + 1) / steps, x.clone(), x0_hat)
    return x


@register("llada", kinds=("masked",), nfe_per_step=1, order=1, stochastic=True, max_steps=100_000,
          options=dict(LLADA_OPTIONS),
          when_to_use="LLaDA and other prompt-conditioned masked LMs: blockwise, commits the most confident "
                      "tokens; steps = answer length is LLaDA's best setting, fewer steps are faster")
def llada(model, tokens: torch.Tensor, cond: Any = None, *, steps: int, noise: SampleNoise,
          hook: Hook | None = None, block_length: int = 32, cfg_scale: float = 0.0, temperature: float = 0.0):
    """LLaDA low-confidence remasking, semi-autoregressive (arXiv 2502.09992, Alg. 5 with App. B.3's blocks)."""
    return (yield from semi_autoregressive(model, tokens, cond, steps=steps, noise=noise, hook=hook,
                                           block_length=block_length, cfg_scale=cfg_scale,
                                           temperature=temperature, random_scores=False))


@register("llada_random", kinds=("masked",), nfe_per_step=1, order=1, stochastic=True, max_steps=100_000,
          options=dict(LLADA_OPTIONS),
          when_to_use="LLaDA's random remasking (its ablation baseline): commits uniformly chosen positions")
def llada_random(model, tokens: torch.Tensor, cond: Any = None, *, steps: int, noise: SampleNoise,
                 hook: Hook | None = None, block_length: int = 32, cfg_scale: float = 0.0,
                 temperature: float = 0.0):
    """LLaDA random remasking, semi-autoregressive (arXiv 2502.09992, Alg. 4 with blocks)."""
    return (yield from semi_autoregressive(model, tokens, cond, steps=steps, noise=noise, hook=hook,
                                           block_length=block_length, cfg_scale=cfg_scale,
                                           temperature=temperature, random_scores=True))
