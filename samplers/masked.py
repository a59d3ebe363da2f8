"""Masked diffusion samplers: the MDLM ancestral sampler and the first-hitting sampler (FHS).

A masked diffusion model (MDM) on the log-linear schedule masks each token independently with
probability t. Its network is time-agnostic: given a partly masked sequence it returns, for every
position, a distribution over the real tokens (Zheng et al. 2024, "Masked Diffusion Models are Secretly
Time-Agnostic Masked Models and Exploit Inaccurate Categorical Sampling", arXiv 2409.02908). A masked
language model trained with the MDLM loss is therefore an MDM.

Contract: `MaskedDenoiser.logits(tokens, cond) -> (B, L, V)`. Samplers are step machines like every other
sampler (samplers/registry.py): ``machine(model, tokens, cond=None, *, noise, hook=None, **options) -> tokens``
where `tokens` holds the mask id at every position to generate (any other position is given and never
changes: infilling). A sampler calls the network only on the sequences that still change; what that costs
is counted where the model is wrapped (`CallCounter`: calls and rows; a search's `CountedModel`: its NFE
budget), never by the sampler. `run_masked_sampler` returns (tokens, nfe) with nfe the network calls, as
`run_sampler` does. Every random number of sample k comes from noise stream k, so a sample is the same
alone or in a batch.

Categorical draws use the exponential race argmax_i q_i / E_i with E_i = -log(u_i + 1e-10) + 1e-10, the
scheme of MDLM's `_sample_categorical`, in float64. `precision="float32"` reproduces the float32 flaw
faithfully (float32 probabilities; float32 uniforms, which take the 2^24 values k * 2^-24 like
torch.rand) and exists only to demonstrate it: the truncated race cuts off unlikely tokens, which lowers
the effective temperature (arXiv 2409.02908, Sec. 5).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch

from .calls import StepMachine, drive, evaluate_logits
from .errors import InvalidRequest
from .hooks import Hook, report
from .noise import SampleNoise
from .registry import CallCounter, Option, get_spec, register, validate

PRECISIONS = ("float64", "float32")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@runtime_checkable
class MaskedDenoiser(Protocol):
    """A time-agnostic masked model: logits over the vocabulary for every position of a masked sequence."""

    mask_id: int  # the mask token
    vocab_size: int  # V, the last dimension of the logits
    length: int  # the longest sequence the model accepts
    forbidden: tuple[int, ...]  # ids never sampled: the mask, padding, other special tokens

    def logits(self, tokens: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """(B, L) int64 token ids -> (B, L, V) logits."""
        ...


def all_masked(model: MaskedDenoiser, batch: int, length: int | None = None) -> torch.Tensor:
    """A (batch, length) sequence of mask tokens: unconditional generation."""
    return torch.full((batch, length or model.length), model.mask_id, dtype=torch.int64)


def check_tokens(model: MaskedDenoiser, tokens: torch.Tensor) -> None:
    """Refuse what cannot be sampled: wrong shape or type, unknown ids, too long, nothing masked."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise InvalidRequest("tokens: expected an integer tensor of token ids")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise InvalidRequest(f"tokens: expected shape (batch, length), both > 0, got {tuple(tokens.shape)}")
    if tokens.shape[1] > model.length:
        raise InvalidRequest(f"tokens: length {tokens.shape[1]} exceeds the model's length {model.length}")
    bad = (tokens < 0) | (tokens >= model.vocab_size)
    if bad.any():
        raise InvalidRequest(f"tokens: unknown token id {int(tokens[bad][0])} (the vocabulary has ids "
                             f"0..{model.vocab_size - 1})")
    full = ~(tokens == model.mask_id).any(1)
    if full.any():
        raise InvalidRequest(f"tokens: sequence {int(full.nonzero()[0])} has no masked positions "
                             f"(mask id {model.mask_id}); nothing to sample")


def categorical(q: torch.Tensor, u: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """Exponential race: argmax_i q_i / E_i over the last dim, q unnormalised, u ~ U[0, 1) in float64."""
    if precision == "float32":
        q, u = q.float(), (torch.floor(u * 2.0**24) * 2.0**-24).float()
    else:
        q, u = q.double(), u.double()
    exp_noise = -torch.log(u + 1e-10) + 1e-10
    return (q / exp_noise).argmax(-1)


def inverse_cdf(p: torch.Tensor, u: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """One draw per row of the categorical p (normalised over the last dim) from one uniform u per row:
    the first index whose cumulative probability exceeds u (float32: the CDF and u in float32, u on the
    2^-24 grid of torch.rand, which cuts off tokens whose mass falls below float32 resolution)."""
    if precision == "float32":
        cdf, u = p.float().cumsum(-1), (torch.floor(u * 2.0**24) * 2.0**-24).float()
    else:
        cdf, u = p.double().cumsum(-1), u.double()
    index = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return index.clamp_max(p.shape[-1] - 1)


def probabilities(model: MaskedDenoiser, logits: torch.Tensor, temperature: float, top_k: int,
                  top_p: float, precision: str) -> torch.Tensor:
    """p_theta over real tokens: forbidden ids removed, then temperature, top-k, top-p (nucleus)."""
    z = logits.to(_DTYPES[precision]) / temperature
    z[..., list(model.forbidden)] = -torch.inf
    if 0 < top_k < z.shape[-1]:
        z = z.masked_fill(z < z.topk(top_k, dim=-1).values[..., -1:], -torch.inf)
    if top_p < 1.0:
        p_sorted, order = torch.softmax(z, -1).sort(-1, descending=True)
        outside = (p_sorted.cumsum(-1) - p_sorted) >= top_p  # keep the smallest set reaching top_p
        z = z.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), -torch.inf)
    return torch.softmax(z, -1)


def _take(cond: Any, rows: torch.Tensor) -> Any:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    return [cond[i] for i in rows.tolist()]


logits_call = evaluate_logits  # the network call of model.logits(x, cond), shape-checked


def _race_uniforms(noise: SampleNoise, counts: list[int], vocab: int) -> torch.Tensor:
    """counts[k] x vocab uniforms from stream k, stacked in sample order (streams grouped by count)."""
    blocks: dict[int, torch.Tensor] = {}
    for c in set(counts) - {0}:
        rows = [k for k, ck in enumerate(counts) if ck == c]
        blocks.update(zip(rows, noise.subset(rows).rand((c, vocab)), strict=True))
    return torch.cat([blocks[k] for k in sorted(blocks)])


def _x0_hat(x: torch.Tensor, probs: torch.Tensor, mask_id: int) -> torch.Tensor:
    return torch.where(x == mask_id, probs.argmax(-1), x)


SAMPLING_OPTIONS = {
    "temperature": Option(float, 1.0, minimum=0.01, maximum=10.0, help="divide the logits by this"),
    "top_k": Option(int, 0, minimum=0, maximum=1_000_000, help="keep the k most likely tokens (0: all)"),
    "top_p": Option(float, 1.0, minimum=0.001, maximum=1.0, help="nucleus: smallest set with this mass"),
    "precision": Option(str, "float64", choices=PRECISIONS,
                        help="dtype of categorical sampling; float32 only to demonstrate its flaw"),
}


@register("mdlm", kinds=("masked",), nfe_per_step=1, order=1, stochastic=True, max_steps=100_000,
          when_to_use="masked diffusion baseline: N ancestral steps (few steps: faster, multi-token "
                      "errors; N >> L: exact but slow); prefer first_hitting",
          options={**SAMPLING_OPTIONS,
                   "cached": Option(bool, True, help="skip the network when a sequence did not change"),
                   "final": Option(str, "ancestral", choices=("ancestral", "greedy"),
                                   help="last step: sample the remaining masks, or take the argmax")})
def mdlm(model: MaskedDenoiser, tokens: torch.Tensor, cond: Any = None, *, steps: int, noise: SampleNoise,
         hook: Hook | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         precision: str = "float64", cached: bool = True, final: str = "ancestral"):
    """MDLM ancestral sampler on the log-linear schedule (Sahoo et al. 2024, arXiv 2406.07524, Sec. 3.3).

    Grid t_i = 1 - i/N. From t to s < t a masked token becomes v with probability p_theta(v | x_t)(t - s)/t
    and stays masked with probability s/t (one categorical over V + 1 outcomes, the mask standing for
    "stay"); the last step (s = 0) unmasks everything, by sampling or by argmax (`final`). Caching
    (MDLM's ddpm_cache) reuses p_theta while a sequence is unchanged: NFE <= min(N, L) per sample.
    """
    x = tokens.clone()
    batch, length = x.shape
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    probs = torch.zeros(batch, length, model.vocab_size, dtype=_DTYPES[precision])
    stale = torch.ones(batch, dtype=torch.bool)
    for i in range(steps):
        masked = x == model.mask_id
        active = masked.any(1)
        if not active.any():
            break
        need = (active & stale) if cached else active
        if need.any():
            rows = need.nonzero()[:, 0]
            logits = yield logits_call(model, x[rows], _take(cond, rows))
            probs[rows] = probabilities(model, logits,
                                        temperature, top_k, top_p, precision)
            stale[rows] = False
        t, s = float(times[i]), float(times[i + 1])
        b, l = masked.nonzero(as_tuple=True)
        p = probs[b, l]
        if i == steps - 1 and final == "greedy":
            new = p.argmax(-1)
        else:
            q = p * (t - s)
            q[:, model.mask_id] = s  # the mask's own probability is 0 under p_theta; its slot means "stay"
            new = categorical(q, _race_uniforms(noise, masked.sum(1).tolist(), model.vocab_size), precision)
        x[b, l] = new
        stale[b[new != model.mask_id]] = True
        if hook is not None:
            report(hook, i, steps, t, s, x.clone(), _x0_hat(x, probs, model.mask_id))
    return x


@register("first_hitting", kinds=("masked",), nfe_per_step=1, order=1, stochastic=True, one_step_per_mask=True,
          max_steps=1_000_000, options=dict(SAMPLING_OPTIONS),
          when_to_use="masked diffusion models: exact, one token per step, exactly L network calls; "
                      "the default for masked models")
def first_hitting(model: MaskedDenoiser, tokens: torch.Tensor, cond: Any = None, *, noise: SampleNoise,
                  hook: Hook | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  precision: str = "float64"):
    """First-hitting sampler, FHS (Zheng et al. 2024, arXiv 2409.02908, Sec. 4, Alg. 1).

    With n tokens masked at time tau_n, the next unmasking time of the log-linear schedule is
    tau_{n-1} = tau_n u^(1/n); by exchangeability the token unmasked then is a uniformly chosen masked
    position, drawn from p_theta. The network ignores time, so tau only reaches the hook. One token per
    step: a sequence with n masks takes exactly n steps and n network calls. Each sequence keeps its own
    tau and n; one that is done leaves the batch.  Three uniforms per sample and step: the time, the
    position, and its token by inverse CDF (not one per vocabulary entry).
    """
    x = tokens.clone()
    batch = x.shape[0]
    n = (x == model.mask_id).sum(1)
    tau = torch.ones(batch, dtype=torch.float64)
    steps = int(n.max())
    for i in range(steps):
        rows = (n > 0).nonzero()[:, 0]
        u = noise.subset(rows.tolist()).rand((3,))  # per sample: [time, position, token]
        tau_before = float(tau[rows].mean())
        tau[rows] *= u[:, 0] ** (1.0 / n[rows])
        xs = x[rows]
        logits = yield logits_call(model, xs, _take(cond, rows))
        masked = xs == model.mask_id
        j = torch.minimum((u[:, 1] * n[rows]).long(), n[rows] - 1)  # the j-th masked position, uniform
        pos = (masked & (masked.cumsum(1) == (j + 1)[:, None])).long().argmax(1)
        p = probabilities(model, logits[torch.arange(len(rows)), pos], temperature, top_k, top_p, precision)
        x[rows, pos] = inverse_cdf(p, u[:, 2], precision)  # only the unmasking position's token is drawn
        n[rows] -= 1
        if hook is not None:
            x0_hat = x.clone()
            x0_hat[rows] = _x0_hat(x[rows], logits.index_fill(-1, torch.tensor(model.forbidden), -torch.inf),
                                   model.mask_id)
            report(hook, i, steps, tau_before, float(tau[rows].mean()), x.clone(), x0_hat)
    return x


def run_masked_sampler(name: str, model: MaskedDenoiser, tokens: torch.Tensor, *, steps: int | None = None,
                       cond: Any = None, noise: SampleNoise | None = None, hook: Hook | None = None,
                       options: dict[str, Any] | None = None) -> tuple[torch.Tensor, int]:
    """Validate, then run masked sampler `name`; returns (tokens, nfe), nfe the network calls (a call counts
    once however many sequences it carries, as in `run_sampler`). Rows per sequence: wrap the model in a
    `CallCounter` and read its `rows`."""
    return drive(masked_sampler_machine(name, model, tokens, steps=steps, cond=cond, noise=noise, hook=hook,
                                        options=options))


def masked_sampler_machine(name: str, model: MaskedDenoiser, tokens: torch.Tensor, *, steps: int | None = None,
                           cond: Any = None, noise: SampleNoise | None = None, hook: Hook | None = None,
                           options: dict[str, Any] | None = None) -> StepMachine[tuple[torch.Tensor, int]]:
    """`run_masked_sampler` as a step machine (validation runs on the first advance); returns (tokens, nfe).

    `steps` is N for mdlm; first_hitting takes one step per masked position, so leave it None (or pass
    exactly that number). The hook's StepInfo.nfe is the number of network calls so far.
    """
    check_tokens(model, tokens)
    tokens = tokens.long()
    masked = int((tokens == model.mask_id).sum(1).max())
    takes_steps = not get_spec(name).one_step_per_mask
    if not takes_steps:
        if steps is not None and steps != masked:
            raise InvalidRequest(f"steps: {name} takes exactly one step per masked position "
                                 f"({masked} here); leave steps unset")
        steps = masked
    elif steps is None:
        raise InvalidRequest(f"steps: sampler {name!r} needs a number of steps")
    spec, opts = validate(name, steps, options, kind="masked")
    if noise is None:
        raise InvalidRequest(f"sampler: {name!r} is stochastic and needs per-sample noise (seeds)")
    if len(noise) != tokens.shape[0]:
        raise InvalidRequest(f"seeds: {len(noise)} seeds for {tokens.shape[0]} sequences")
    counter = CallCounter(model)
    counted = None if hook is None else (lambda info: hook(replace(info, nfe=counter.calls)))
    if takes_steps:
        opts["steps"] = steps
    out = yield from spec.machine(counter, tokens, cond, noise=noise, hook=counted, **opts)
    return out, counter.calls
