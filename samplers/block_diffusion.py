"""Block (canvas) diffusion with uniform corruption: DiffusionGemma's decoding loop and its three samplers.

A block-diffusion LM (DiffusionGemma, `transformers.DiffusionGemmaForBlockDiffusion`) generates one canvas of
C tokens at a time: the context (prompt + earlier canvases) conditions a bidirectional denoiser over the
canvas. There is no mask token: a canvas starts as uniformly random tokens, and every step the network
predicts all C positions (self-conditioned on the previous step's logits) and a sampler decides which
predictions to keep and which positions to renoise with fresh random tokens. After `steps` steps (or earlier,
see below) the canvas joins the context; generation stops after the canvas holding EOS.

Samplers (the per-step rules of diffusers' schedulers, re-derived from their definitions):
- `block_refinement`: commit-by-confidence. Step i brings the committed count to ceil((i + 1) C / steps),
  taking the most confident uncommitted predictions (plus any above `threshold`); committed tokens stay,
  the rest are renoised.
- `discrete_ddim`: the exact posterior of the uniform process on the linear schedule alpha = 1 - t (D3PM,
  arXiv 2107.03006): from t to s each position jumps to the predicted x0, stays, or jumps to a random
  token, with masses b(1 - a)/K + ab[x_t = x0], a(1 - b)/K, (1 - a)(1 - b)/K (a = alpha_t / alpha_s,
  b = alpha_s); the last step commits x0.
- `entropy_bound`: EB-sampler (arXiv 2505.24857): accept the k lowest-entropy positions while the sum of
  their entropies minus the largest stays <= `entropy_bound`; temperature annealed from t_max to t_min.
Adaptive stopping (DiffusionGemma's released setting): a sample's canvas is final once its argmax
prediction was unchanged for `stability_threshold` steps and its mean per-token entropy is below
`confidence_threshold` (0 turns it off); it then leaves the batch for the rest of the canvas.

Hook: StepInfo.x is the sequence so far with -1 at canvas positions that are still noise (block_refinement's
uncommitted ones; every position before a canvas's last step for the other two), x0_hat the current canvas.

Model contract: `canvas_logits(context, canvas, sc_logits, sc_mask) -> (B, C, V)` float logits, plus
`canvas_length`, `vocab_size`, `eos_id`. Randomness: sample k draws from its own stream k with the same
torch calls, in the same order, as diffusers' DiffusionGemmaPipeline does for a batch of one (canvas
`randint`, then per step the scheduler's `multinomial` / `randint`), so a sample equals the pipeline's
output for the same seed, alone or in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .calls import NetworkCall, StepMachine, drive, evaluate_canvas
from .errors import InvalidRequest
from .hooks import Hook, report
from .noise import SampleNoise
from .registry import CallCounter, Option, register, validate

KIND = "block_diffusion"

CANVAS_OPTIONS = {
    "gen_length": Option(int, 256, minimum=1, maximum=1_000_000,
                         help="tokens to generate, rounded up to whole canvases"),
    "confidence_threshold": Option(float, 0.005, minimum=0.0, maximum=100.0,
                                   help="adaptive stopping: mean entropy below this (and stable argmax) ends a "
                                        "canvas early; 0: always run every step"),
    "stability_threshold": Option(int, 1, minimum=1, maximum=1000,
                                  help="steps the argmax must stay unchanged for adaptive stopping"),
    "eos_early_stop": Option(bool, True, help="stop after the canvas that holds EOS"),
}
TEMPERATURE = {"temperature": Option(float, 0.0, minimum=0.0, maximum=10.0, help="0: argmax proposals")}


def _generator(noise: SampleNoise, k: int) -> torch.Generator:
    return noise.generator(k)  # per-sample torch.Generator: randint / multinomial need the generator itself


def propose(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) logits -> (tokens, probability of each token under softmax(logits)); argmax at temperature 0."""
    probs = torch.softmax(logits.float(), -1)
    if temperature == 0:
        tokens = logits.argmax(-1)
    else:
        tokens = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen)[:, 0]
    return tokens, probs.gather(-1, tokens[:, None])[:, 0]


def refinement_step(logits, canvas, committed, step, steps, gen, *, temperature, threshold, editing_threshold):
    """Commit-by-confidence, uniform corruption (diffusers BlockRefinementScheduler with mask_token_id=None).

    Confidence is the drawn token's probability under the tempered distribution it was drawn from."""
    tokens, conf = propose(logits / temperature, 1.0, gen) if temperature > 0 else propose(logits, 0.0, gen)
    length = canvas.shape[-1]
    needed = max(0, ((step + 1) * length + steps - 1) // steps - int(committed.sum()))
    ranks = conf.masked_fill(committed, -torch.inf)[None].argsort(dim=-1, descending=True).argsort(dim=-1)[0]
    transfer = ~committed & ((ranks < needed) | (conf > threshold))
    edit = committed & (tokens != canvas) & (conf > editing_threshold) if editing_threshold > 0 else transfer & False
    out = torch.where(transfer | edit, tokens, canvas)
    committed = committed | transfer
    random = torch.randint(0, logits.shape[-1], canvas.shape, generator=gen)
    return torch.where(committed, out, random), committed, logits


def ddim_step(logits, canvas, committed, step, steps, gen, *, temperature):
    """One draw from the uniform-process posterior q(x_s | x_t, x0) on alpha = 1 - t (D3PM, arXiv 2107.03006)."""
    tokens, _ = propose(logits, temperature, gen)
    vocab = logits.shape[-1]
    alpha_t, alpha_s = step / steps, (step + 1) / steps
    a = alpha_t / alpha_s
    same = (canvas == tokens).float()
    ones = torch.ones_like(same)
    route = torch.stack([alpha_s * (1 - a) / vocab + a * alpha_s * same, a * (1 - alpha_s) / vocab * ones,
                         (1 - a) * (1 - alpha_s) / vocab * ones], -1)
    routes = torch.multinomial(route / route.sum(-1, keepdim=True), 1, generator=gen)[:, 0]
    random = torch.randint(0, vocab, canvas.shape, generator=gen)
    out = torch.where(routes == 0, tokens, canvas)
    return torch.where(routes == 2, random, out), committed, logits


def entropy_bound_step(logits, canvas, committed, step, steps, gen, *, entropy_bound, t_max, t_min):
    """EB-sampler step (arXiv 2505.24857): accept lowest-entropy positions within the bound, renoise the rest."""
    temperature = t_min + (t_max - t_min) * (steps - step) / steps
    shaped = logits / temperature
    tokens, _ = propose(shaped, 1.0, gen)
    entropy = torch.distributions.Categorical(logits=shaped).entropy()
    ordered, order = entropy.sort()
    accepted = torch.zeros_like(committed).scatter(-1, order, ordered.cumsum(-1) - ordered <= entropy_bound)
    random = torch.randint(0, logits.shape[-1], canvas.shape, generator=gen)
    return torch.where(accepted, tokens, random), committed, shaped


def canvas_call(model, context, canvas, sc_logits, sc_mask) -> NetworkCall:
    return evaluate_canvas(model, context, canvas, sc_logits, sc_mask)


def canvas_decode(model, prompt: torch.Tensor, cond: Any, *, steps: int, noise: SampleNoise, hook: Hook | None,
                  step_fn: Callable, gen_length: int, confidence_threshold: float, stability_threshold: int,
                  eos_early_stop: bool):
    """DiffusionGemma's outer loop over canvases and inner loop over denoising steps; returns the tokens."""
    batch, prompt_len = prompt.shape
    length, vocab, eos = model.canvas_length, model.vocab_size, model.eos_id
    canvases = -(-gen_length // length)
    gens = [_generator(noise, k) for k in range(batch)]
    out = torch.full((batch, prompt_len + canvases * length), eos if eos is not None else 0, dtype=torch.long)
    out[:, :prompt_len] = prompt
    live = list(range(batch))
    for c in range(canvases):
        end = prompt_len + c * length
        canvas = torch.stack([torch.randint(0, vocab, (1, length), generator=gens[k])[0] for k in live])
        committed = torch.zeros(len(live), length, dtype=torch.bool)
        sc = torch.zeros(len(live), length, vocab)
        has_sc = torch.zeros(len(live), dtype=torch.bool)
        history = torch.full((stability_threshold, len(live), length), -1, dtype=torch.long)
        rows = torch.arange(len(live))  # the live samples still denoising this canvas
        for step in range(steps):
            idx = [live[r] for r in rows.tolist()]
            logits = yield canvas_call(model, out[idx, :end], canvas[rows], sc[rows], has_sc[rows])
            pred = torch.empty(len(rows), length, vocab)
            for j, r in enumerate(rows.tolist()):  # per sample: its own generator, its own draws
                gen = gens[live[r]]
                canvas[r], committed[r], pred[j] = step_fn(logits[j], canvas[r], committed[r], step, steps, gen)
            sc[rows], has_sc[rows] = pred, True
            if hook is not None:  # x: positions still noise (not committed, before the last step) are -1
                estimate = out.clone()
                estimate[live, end:end + length] = canvas
                settled = out.clone()
                settled[live, end:end + length] = canvas if step == steps - 1 else canvas.masked_fill(~committed, -1)
                report(hook, c * steps + step, canvases * steps, 1 - step / steps, 1 - (step + 1) / steps, settled,
                       estimate)
            if confidence_threshold > 0:
                argmax = pred.argmax(-1)
                stable = (history[:, rows] == argmax[None]).all(-1).all(0)
                history[:, rows] = torch.roll(history[:, rows], -1, 0)
                history[-1, rows] = argmax
                done = stable & (torch.distributions.Categorical(logits=pred).entropy().mean(-1) < confidence_threshold)
                canvas[rows[done]] = argmax[done]
                rows = rows[~done]
                if len(rows) == 0:
                    break
        out[live, end:end + length] = canvas
        if eos_early_stop and eos is not None:
            live = [k for i, k in enumerate(live) if not (canvas[i] == eos).any()]
            if not live:
                break
    return out


def _register(name: str, step_fn: Callable, options: dict, when_to_use: str, doc: str):
    def machine(model, tokens: torch.Tensor, cond: Any = None, *, steps: int, noise: SampleNoise,
                hook: Hook | None = None, gen_length: int = 256, confidence_threshold: float = 0.005,
                stability_threshold: int = 1, eos_early_stop: bool = True, **step_options):
        def bound(logits, canvas, committed, step, n, gen):
            return step_fn(logits, canvas, committed, step, n, gen, **step_options)
        return (yield from canvas_decode(model, tokens, cond, steps=steps, noise=noise, hook=hook, step_fn=bound,
                                         gen_length=gen_length, confidence_threshold=confidence_threshold,
                                         stability_threshold=stability_threshold, eos_early_stop=eos_early_stop))
    machine.__name__ = machine.__qualname__ = name
    machine.__doc__ = doc
    return register(name, kinds=(KIND,), nfe_per_step=1, order=1, stochastic=True, max_steps=10_000,
                    options={**CANVAS_OPTIONS, **options}, when_to_use=when_to_use)(machine)


block_refinement = _register(
    "block_refinement", refinement_step,
    {**TEMPERATURE,
     "threshold": Option(float, 0.95, minimum=0.0, maximum=1.0, help="also commit any prediction this confident"),
     "editing_threshold": Option(float, 0.0, minimum=0.0, maximum=1.0,
                                 help="replace committed tokens predicted differently above this confidence; 0: off")},
    "DiffusionGemma's default: commit the most confident tokens of the canvas each step, renoise the rest",
    "Block refinement (commit-by-confidence) over uniform-corruption canvases (DiffusionGemma).")
discrete_ddim = _register(
    "discrete_ddim", ddim_step, dict(TEMPERATURE),
    "uniform-corruption canvases: the exact D3PM posterior step (ancestral); stochastic until the last step",
    "Discrete DDIM: ancestral posterior sampling of the uniform process (D3PM, arXiv 2107.03006).")
entropy_bound = _register(
    "entropy_bound", entropy_bound_step,
    {"entropy_bound": Option(float, 0.1, minimum=0.0, maximum=1e6, help="joint entropy budget per step (nats)"),
     "t_max": Option(float, 0.8, minimum=0.01, maximum=10.0, help="temperature on the first step"),
     "t_min": Option(float, 0.4, minimum=0.01, maximum=10.0, help="temperature on the last step")},
    "uniform-corruption canvases: accepts as many low-entropy tokens per step as the entropy budget allows",
    "Entropy-bounded sampler, EB-sampler (arXiv 2505.24857), on uniform-corruption canvases.")


def block_diffusion_machine(name: str, model, prompt: torch.Tensor, *, steps: int, noise: SampleNoise,
                            cond: Any = None, hook: Hook | None = None, options: dict | None = None) -> StepMachine:
    """Validate, then run canvas sampler `name` as a step machine; returns (tokens, nfe), nfe the network calls
    (as `run_sampler`; a sample that stopped early leaves the later calls)."""
    spec, opts = validate(name, steps, options, kind=KIND)
    if not isinstance(prompt, torch.Tensor) or prompt.ndim != 2 or prompt.shape[1] == 0:
        raise InvalidRequest("tokens: expected a (batch, prompt length) tensor of prompt ids, prompt not empty")
    if ((prompt < 0) | (prompt >= model.vocab_size)).any():
        raise InvalidRequest(f"tokens: ids must lie in 0..{model.vocab_size - 1}")
    if len(noise) != prompt.shape[0]:
        raise InvalidRequest(f"seeds: {len(noise)} seeds for {prompt.shape[0]} sequences")
    if opts["gen_length"] + prompt.shape[1] + model.canvas_length > getattr(model, "length", math.inf):
        raise InvalidRequest(f"options: prompt + gen_length exceeds the model's length {model.length}")
    counter = CallCounter(model)
    out = yield from spec.machine(counter, prompt.long(), cond, steps=steps, noise=noise, hook=hook, **opts)
    return out, counter.calls


def run_block_diffusion(name: str, model, prompt: torch.Tensor, **kwargs):
    """`block_diffusion_machine` driven to completion."""
    return drive(block_diffusion_machine(name, model, prompt, **kwargs))
