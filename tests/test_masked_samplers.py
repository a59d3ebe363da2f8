"""Masked diffusion samplers (mdlm, first_hitting) against a denoiser with an exactly known joint."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from samplers.errors import InvalidRequest
from samplers.masked import MaskedDenoiser, categorical, probabilities, run_masked_sampler
from samplers.noise import SampleNoise
from samplers.registry import CallCounter

REAL = 3  # real tokens 0..2; 3 is a forbidden "pad", 4 the mask
PAD, MASK = REAL, REAL + 1


class JointDenoiser:
    """The exact conditionals of a fixed joint P over REAL^L: p(x^l = v | x_t) is P summed over the clean
    sequences consistent with x_t that have v at l. Both samplers must then reproduce P exactly."""

    mask_id, vocab_size, forbidden = MASK, REAL + 2, (PAD, MASK)

    def __init__(self, length: int = 3, seed: int = 0, concentration: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.length = length
        self.states = torch.tensor(list(itertools.product(range(REAL), repeat=length)))
        alpha = torch.full((len(self.states),), concentration, dtype=torch.float64)
        self.joint = torch._standard_gamma(alpha, generator=g)  # a Dirichlet(alpha) draw, once normalised
        self.joint /= self.joint.sum()
        self.calls = 0

    def logits(self, tokens, cond=None):
        self.calls += 1
        fits = ((tokens[:, None, :] == MASK) | (tokens[:, None, :] == self.states[None])).all(-1)
        weight = fits * self.joint  # (B, S)
        out = torch.full((*tokens.shape, self.vocab_size), 3.0, dtype=torch.float64)  # pad/mask: high logits
        for l in range(tokens.shape[1]):
            onehot = torch.nn.functional.one_hot(self.states[:, l], REAL).double()
            out[:, l, :REAL] = (weight @ onehot).log()
        return out.float()


def joint_counts(model: JointDenoiser, x: torch.Tensor) -> torch.Tensor:
    index = (x * REAL ** torch.arange(model.length - 1, -1, -1)).sum(1)
    return torch.bincount(index, minlength=len(model.states)).double()


def sample(name, model, batch, seed0=0, steps=None, tokens=None, **options):
    tokens = torch.full((batch, model.length), MASK) if tokens is None else tokens
    noise = SampleNoise(range(seed0, seed0 + len(tokens)))
    return run_masked_sampler(name, model, tokens, steps=steps, noise=noise, options=options)


def chi_square_p(model, x) -> float:
    return stats.chisquare(joint_counts(model, x), len(x) * model.joint.numpy()).pvalue


def test_table_is_a_masked_denoiser():
    assert isinstance(JointDenoiser(), MaskedDenoiser)


def test_first_hitting_matches_the_exact_joint():
    model = JointDenoiser()
    x, nfe = sample("first_hitting", model, 6000)
    assert chi_square_p(model, x) > 1e-3
    assert nfe == model.length == model.calls


def test_mdlm_many_steps_matches_the_exact_joint():
    model = JointDenoiser()
    x, nfe = sample("mdlm", model, 2500, seed0=10_000, steps=64)
    assert chi_square_p(model, x) > 1e-3  # its bias at N = 64 (TV 0.005) is far below what 2500 can see
    assert nfe == model.calls <= 64


def mdlm_exact(model: JointDenoiser, steps: int) -> torch.Tensor:
    """The exact law of the mdlm chain at finite N: every position independently stays masked with
    probability s/t or becomes v with probability p(v | x_t)(t - s)/t; propagated over all partial states."""
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    law = {(MASK,) * model.length: 1.0}
    for t, s in zip(times[:-1], times[1:]):
        nxt: dict[tuple, float] = {}
        for state, mass in law.items():
            p = probabilities(model, model.logits(torch.tensor([state])), 1.0, 0, 1.0, "float64")[0]
            moves = [[(v, 1.0)] if v != MASK else
                     [(MASK, s / t)] + [(w, float(p[l, w]) * (t - s) / t) for w in range(REAL)]
                     for l, v in enumerate(state)]
            for combo in itertools.product(*moves):
                key = tuple(v for v, _ in combo)
                nxt[key] = nxt.get(key, 0.0) + mass * math.prod(w for _, w in combo)
        law = {k: m for k, m in nxt.items() if m > 0}
    out = torch.zeros(len(model.states), dtype=torch.float64)
    for state, mass in law.items():
        out[sum(v * REAL ** (model.length - 1 - l) for l, v in enumerate(state))] += mass
    return out


def test_mdlm_few_steps_matches_its_exact_finite_step_law():
    model = JointDenoiser()
    law = mdlm_exact(model, 4)
    assert (law - model.joint).abs().sum() / 2 > 0.02  # a few steps are measurably not the joint
    x, _ = sample("mdlm", model, 2500, seed0=20_000, steps=4)
    assert stats.chisquare(joint_counts(model, x), 2500 * law.numpy()).pvalue > 1e-3
    assert chi_square_p(model, x) < 1e-3


def test_chi_square_rejects_mdlm_with_one_step():
    """Control: one step unmasks all positions independently (product of marginals), which is wrong."""
    model = JointDenoiser()
    x, _ = sample("mdlm", model, 2500, seed0=10_000, steps=1)
    assert chi_square_p(model, x) < 1e-6


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 40])
def test_cached_mdlm_calls_the_network_at_most_min_n_l_times(steps):
    model = JointDenoiser(length=4)
    alone = {cached: [sample("mdlm", model, 1, seed0=k, steps=steps, cached=cached)[1] for k in range(24)]
             for cached in (True, False)}  # per sample: a sample's draws do not depend on its batch
    assert max(alone[True]) <= min(steps, model.length)
    assert all(u >= c for u, c in zip(alone[False], alone[True], strict=True)) and max(alone[False]) == steps
    counter = CallCounter(model)  # batched: the counter sees every sample's calls as rows
    _, calls = sample("mdlm", counter, 24, steps=steps)
    assert counter.rows == sum(alone[True]) and counter.calls == calls <= steps


def test_cached_and_uncached_mdlm_sample_the_same_tokens():
    model = JointDenoiser(length=4)
    a, _ = sample("mdlm", model, 32, steps=20)
    b, _ = sample("mdlm", model, 32, steps=20, cached=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,steps", [("first_hitting", None), ("mdlm", 7)])
def test_a_sample_is_the_same_alone_or_in_a_batch(name, steps):
    model = JointDenoiser(length=4)
    tokens = torch.full((5, 4), MASK)
    tokens[1, 0], tokens[3, 1:3] = 2, 0  # different numbers of masks: different times inside one batch
    batch, _ = run_masked_sampler(name, model, tokens, steps=steps, noise=SampleNoise([7, 8, 9, 10, 11]))
    for k in range(5):
        alone, _ = run_masked_sampler(name, model, tokens[k:k + 1], steps=steps,
                                      noise=SampleNoise([7 + k]))
        assert torch.equal(alone[0], batch[k])


@pytest.mark.parametrize("name,steps", [("first_hitting", None), ("mdlm", 3), ("mdlm", 50)])
def test_given_tokens_never_change_and_forbidden_tokens_are_never_sampled(name, steps):
    model = JointDenoiser(length=5)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, REAL, (200, 5), generator=g)
    tokens[torch.rand(200, 5, generator=g) < 0.6] = MASK
    tokens[:, 2] = MASK
    x, _ = sample(name, model, 0, steps=steps, tokens=tokens)
    given = tokens != MASK
    assert torch.equal(x[given], tokens[given])
    assert (x[~given] < REAL).all()


def test_hook_sees_every_step_with_the_running_nfe():
    model = JointDenoiser(length=4)
    seen = []
    run_masked_sampler("first_hitting", model, torch.full((2, 4), MASK), noise=SampleNoise([1, 2]),
                       hook=seen.append)
    assert [s.step for s in seen] == [0, 1, 2, 3] and [s.nfe for s in seen] == [1, 2, 3, 4]
    assert all(((s.x != MASK).sum(1) == s.step + 1).all() for s in seen)
    assert (seen[-1].x0_hat == seen[-1].x).all() and seen[0].sigma == 1.0 and seen[-1].sigma_next < 1.0
    assert all((s.x0_hat < REAL).all() for s in seen)  # previews never show a forbidden token
    seen.clear()
    run_masked_sampler("mdlm", model, torch.full((2, 4), MASK), steps=6, noise=SampleNoise([1, 2]),
                       hook=seen.append)
    assert [s.step for s in seen] == list(range(6)) and seen[-1].sigma_next == 0.0
    assert all((s.x0_hat < REAL).all() for s in seen) and seen[-1].nfe <= 6  # batch calls: <= N


def test_float32_race_cuts_off_a_long_tail_and_float64_does_not():
    """A peaked distribution: one token of weight 1 and K = 5e6 tokens of weight r = 2e-8 each (exact
    tail mass Kr / (1 + Kr) = 1/11). The K tail tokens share one weight, so which of them leads the race
    is decided by the largest of their K uniforms, distributed as U^(1/K): one uniform drawn that way is
    exactly the K-token race, in float32 too (rounding to the float32 grid is monotone)."""
    k, r, n = 5_000_000, 2e-8, 20_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    u[:, 1] = torch.exp(torch.log(u[:, 1]) / k)
    q = torch.tensor([1.0, r], dtype=torch.float64).expand(n, 2)
    tail = 1 / 11

    def entropy(f):  # of the K+1-token distribution, given the tail's mass f (tail tokens exchangeable)
        return -(f * math.log(f) + (1 - f) * math.log(1 - f)) + f * math.log(k)

    exact = entropy(tail)
    f64 = float((categorical(q, u, "float64") == 1).double().mean())
    f32 = float((categorical(q, u, "float32") == 1).double().mean())
    mc_error = math.sqrt(tail * (1 - tail) / n) * (math.log((1 - tail) / tail) + math.log(k))
    assert abs(entropy(f64) - exact) < 4 * mc_error
    assert entropy(f32) < exact - 10 * mc_error


def test_probabilities_apply_forbidden_temperature_top_k_and_top_p():
    model = JointDenoiser()
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]))
    logits[0, MASK] = 10.0
    p = probabilities(model, logits, 1.0, 0, 1.0, "float64")
    assert p[0, PAD] == 0 and p[0, MASK] == 0
    assert torch.allclose(p[0, :3], torch.tensor([0.5, 0.3, 0.15], dtype=torch.float64) / 0.95)
    p = probabilities(model, logits, 1.0, 2, 1.0, "float64")
    assert torch.allclose(p[0, :3], torch.tensor([0.625, 0.375, 0.0], dtype=torch.float64))
    p = probabilities(model, logits, 1.0, 0, 0.6, "float64")  # 0.5/0.95 < 0.6 <= 0.8/0.95: two tokens
    assert torch.allclose(p[0, :3], torch.tensor([0.625, 0.375, 0.0], dtype=torch.float64))
    p = probabilities(model, logits, 1.0, 0, 0.5, "float64")  # the top token alone has 0.526 >= 0.5
    assert torch.equal(p[0, :3], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    hot = probabilities(model, logits, 2.0, 0, 1.0, "float64")
    want = torch.tensor([0.5, 0.3, 0.15], dtype=torch.float64).sqrt()
    assert torch.allclose(hot[0, :3], want / want.sum())


def test_top_k_one_fills_every_position_with_its_argmax():
    model = JointDenoiser(length=3)
    x, _ = sample("mdlm", model, 4, steps=1, top_k=1)  # one step: every position from the all-mask logits
    marginal_argmax = model.logits(torch.full((1, 3), MASK))[0, :, :REAL].argmax(-1)
    assert (x == marginal_argmax).all()


@pytest.mark.parametrize("tokens,message", [
    (torch.tensor([[0, MASK, 7]]), "unknown token id 7"),
    (torch.tensor([[-1, MASK, 0]]), "unknown token id -1"),
    (torch.full((1, 4), MASK), "exceeds the model's length 3"),
    (torch.tensor([[0, 1, 2], [0, MASK, 1]]), "sequence 0 has no masked positions"),
    (torch.full((1, 3), float(MASK)), "integer tensor"),
    (torch.full((3,), MASK), "shape"),
])
def test_bad_tokens_are_refused(tokens, message):
    with pytest.raises(InvalidRequest, match=message):
        run_masked_sampler("first_hitting", JointDenoiser(), tokens, noise=SampleNoise(range(len(tokens))))


@pytest.mark.parametrize("name,steps,options,message", [
    ("mdlm", 8, {"temperature": 0.0}, "below the minimum"),
    ("mdlm", 8, {"top_p": 1.5}, "above the maximum"),
    ("mdlm", 8, {"top_k": -1}, "below the minimum"),
    ("mdlm", 8, {"precision": "float16"}, "not one of"),
    ("mdlm", 8, {"cached": "yes"}, "true or false"),
    ("mdlm", 8, {"final": "argmax"}, "not one of"),
    ("first_hitting", None, {"cached": True}, "not an option"),
    ("mdlm", 0, {}, "outside"),
    ("mdlm", None, {}, "needs a number of steps"),
    ("first_hitting", 5, {}, "exactly one step per masked position"),
    ("euler_masked", 8, {}, "unknown sampler"),
])
def test_bad_options_are_refused(name, steps, options, message):
    tokens = torch.full((1, 3), MASK)
    with pytest.raises(InvalidRequest, match=message):
        run_masked_sampler(name, JointDenoiser(), tokens, steps=steps, noise=SampleNoise([0]),
                           options=options)


def test_missing_or_mismatched_seeds_are_refused():
    tokens = torch.full((2, 3), MASK)
    with pytest.raises(InvalidRequest, match="needs per-sample noise"):
        run_masked_sampler("first_hitting", JointDenoiser(), tokens)
    with pytest.raises(InvalidRequest, match="1 seeds for 2 sequences"):
        run_masked_sampler("first_hitting", JointDenoiser(), tokens, noise=SampleNoise([0]))


class WideVocabulary(JointDenoiser):
    """The same joint over a vocabulary padded with `extra` never-sampled ids (a real tokenizer's 30k ids)."""

    def __init__(self, extra: int):
        super().__init__()
        self.vocab_size = REAL + 2 + extra  # the extra ids get the pad's high logit, and are forbidden
        self.forbidden = (PAD, MASK, *range(REAL + 2, REAL + 2 + extra))


def test_first_hitting_draws_one_uniform_per_token_whatever_the_vocabulary():
    """FHS picks the unmasking position first and draws only that token, by inverse CDF from one uniform:
    its random stream, and so every sample, does not depend on how many ids the vocabulary has."""
    small, _ = sample("first_hitting", JointDenoiser(), 64)
    wide, _ = sample("first_hitting", WideVocabulary(extra=5000), 64)
    assert torch.equal(small, wide)


def test_inverse_cdf_draws_the_categorical():
    from samplers.masked import inverse_cdf

    p = torch.tensor([0.5, 0.0, 0.2, 0.3], dtype=torch.float64)
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(inverse_cdf(p.expand(len(u), -1), u), minlength=4).double()
    assert counts[1] == 0 and stats.chisquare(counts[[0, 2, 3]], len(u) * p[[0, 2, 3]].numpy()).pvalue > 1e-3
