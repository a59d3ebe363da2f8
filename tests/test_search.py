"""search/: budgets, determinism, the registry's validation, verifiers, progress hooks, and that every
reward-driven search concentrates more mass on a rewarded GMM component than best-of-N at equal NFE."""

import pytest
import torch

from samplers.errors import BudgetExceeded, Cancelled, InvalidRequest
from samplers.gmm import gmm_2d
from samplers.processes import DiscreteVP, RectifiedFlow
from search import SEARCHES, VERIFIERS, Budget, CountedModel, build_verifier, run_search
from search.evosearch import evo_nfe, evo_plan
from search.verifiers import ClassLogProb, InkMass, WordPresence

MIXTURE = gmm_2d()
FLOW = MIXTURE.denoiser(RectifiedFlow(), "velocity", conditional=True)
VP = MIXTURE.denoiser(DiscreteVP.from_schedule(), "eps", conditional=True)
COMPONENT = build_verifier("gmm-component", {"component": 3}, {"mixture": MIXTURE})
METHODS = {"best_of_n": {}, "evosearch": {}, "rollover_budget_forcing": {}, "fkc": {"select": "verifier"},
           "fk_steering": {}}


class RowCounter:
    """The ground truth for accounting: rows the raw model actually received."""

    def __init__(self, model):
        self.model, self.rows, self.calls = model, 0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, sigma, cond=None):
        self.rows += x.shape[0]
        self.calls += 1
        return self.model(x, sigma, cond)


def _run(method, model=FLOW, budget=80, seeds=(0, 1), cond=(3, 3), guidance=None, options=None, **kw):
    opts = dict(METHODS[method], **(options or {}))
    return run_search(method, model, verifier=COMPONENT, budget_nfe=budget, cond=list(cond), seeds=list(seeds),
                      steps=10, guidance=guidance, options=opts, **kw)


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_best_of_n_spends_exactly_n_times_t(guidance):
    counter = RowCounter(FLOW)
    result = run_search("best_of_n", counter, verifier=COMPONENT, budget_nfe=7 * 10, cond=[1, 2, 3], seeds=[0, 1, 2],
                        steps=10, guidance=guidance)
    passes = 2 if guidance else 1  # CFG: one NFE, two network passes
    assert result.nfe == 70 and result.verifier_calls == 7
    assert result.network_passes == 70 * passes == counter.rows // 3
    assert result.samples.shape == (3, 2) and result.rewards.shape == (3,)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("budget", [40, 97, 160])
def test_every_method_stays_within_its_budget(method, budget):
    counter = RowCounter(FLOW)
    result = run_search(method, counter, verifier=COMPONENT, budget_nfe=budget, cond=[3, 5], seeds=[0, 1], steps=10,
                        guidance=1.5, options=METHODS[method])
    assert result.nfe <= budget
    assert result.network_passes == counter.rows // 2
    assert result.network_passes == 2 * result.nfe  # every NFE here is a guided (two-pass) evaluation
    if method in ("best_of_n", "rollover_budget_forcing"):
        expected = budget - budget % 10 if method == "best_of_n" else budget
        assert result.nfe == expected
    assert budget - result.nfe < 10 + (10 if method == "evosearch" else 0)


def test_counted_model_raises_before_the_network_runs():
    counter = RowCounter(FLOW)
    budget = Budget(limit=5, searches=1)
    model = CountedModel(counter, budget)
    x = torch.zeros(4, 2)
    model(x, 1.0, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(BudgetExceeded, match="budget_nfe"):
        model(x, 1.0, torch.zeros(4, dtype=torch.int64))
    assert counter.calls == 1 and budget.nfe == 4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_seeds_same_result_and_batch_independence(method):
    a = _run(method, seeds=(5, 9), cond=(3, 3))
    b = _run(method, seeds=(5, 9), cond=(3, 3))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.rewards, b.rewards)
    alone = _run(method, seeds=(9,), cond=(3,))
    torch.testing.assert_close(alone.samples[0], a.samples[1], rtol=1e-5, atol=1e-5)
    other = _run(method, seeds=(6, 10), cond=(3, 3))
    assert not torch.equal(other.samples, a.samples)


def test_evosearch_nfe_formula_matches_the_reference_examples():
    assert evo_nfe((0, 20, 30, 40), (42, 26, 26, 26, 30), 50) == 5000  # SD2.1 default = BoN-100 x 50
    assert evo_nfe((5, 20, 30, 40), (14, 7, 7, 7, 10), 50) == 1465  # FLUX default
    e, pops = evo_plan(400, 10, 4, 2.0)
    assert e == (0, 2, 5, 7) and pops[0] == 2 * pops[1]
    assert 400 - 3 < evo_nfe(e, pops, 10) <= 400  # the remainder goes into the last population


def test_fkc_cfg_counts_one_nfe_per_particle_step():
    counter = RowCounter(VP)
    result = run_search("fkc", counter, verifier=None, budget_nfe=40, cond=[2], seeds=[0], steps=10, guidance=3.0)
    assert result.nfe == 40 and result.network_passes == 80 == counter.rows
    assert result.verifier_calls == 0 and torch.isnan(result.rewards).all()
    info = next(t for t in result.trace if t["event"] == "particles")
    assert info["particles"] == 4 and info["beta"] == 3.0


def test_hook_streams_a_nondecreasing_best_so_far_and_can_cancel():
    seen = []
    result = _run("evosearch", budget=120, hook=seen.append)
    best = torch.stack([p.best_rewards for p in seen if p.best_rewards is not None])
    assert (best[1:] >= best[:-1]).all()
    assert all(p.nfe <= 120 and p.budget_nfe == 120 for p in seen)
    assert seen[-1].best_x0.shape == (2, 2)
    torch.testing.assert_close(best[-1], result.rewards)

    def cancel(progress):
        if progress.nfe >= 30:
            raise Cancelled("client went away")

    with pytest.raises(Cancelled):
        _run("rollover_budget_forcing", budget=120, hook=cancel)


@pytest.mark.parametrize("method,options,field", [
    ("", {}, "search.method"),
    ("beam", {}, "search.method"),
    ("evosearch", {"mutation_rate": 1.5}, "search.options.mutation_rate"),
    ("evosearch", {"elites": "two"}, "search.options.elites"),
    ("evosearch", {"evolution_steps": [0, 5, 3]}, "search.options.evolution_steps"),
    ("evosearch", {"population": 4}, "search.options.population"),
    ("fkc", {"target": "tilt"}, "search.options.target"),
    ("rollover_budget_forcing", {"interpolant": "cosine"}, "search.options.interpolant"),
])
def test_bad_requests_name_the_field(method, options, field):
    with pytest.raises(InvalidRequest, match=field.replace(".", r"\.")):
        run_search(method, FLOW, verifier=COMPONENT, budget_nfe=100, cond=[1], seeds=[0], steps=10, options=options)


def test_bad_budgets_seeds_and_conditions():
    with pytest.raises(InvalidRequest, match="search.budget_nfe"):
        _run("rollover_budget_forcing", budget=12)  # needs particles * (1 + steps - 1) + finish
    with pytest.raises(InvalidRequest, match="search.budget_nfe"):
        _run("best_of_n", budget=0)
    with pytest.raises(InvalidRequest, match="search.budget_nfe"):
        _run("best_of_n", budget=9)
    with pytest.raises(InvalidRequest, match="cond"):
        _run("best_of_n", cond=(1, 2, 3))
    with pytest.raises(InvalidRequest, match="seeds"):
        _run("best_of_n", seeds=(-1, 2))
    with pytest.raises(InvalidRequest, match="search.verifier"):
        run_search("evosearch", FLOW, verifier=None, budget_nfe=100, cond=[1], seeds=[0])


def test_verifier_registry():
    assert {"digit-class", "digit-class-b", "ink-mass", "text-words", "gmm-component"} <= set(VERIFIERS)
    assert VERIFIERS["digit-class-b"].held_out
    with pytest.raises(InvalidRequest, match="search.verifier"):
        build_verifier("aesthetic")
    with pytest.raises(InvalidRequest, match="not available"):
        build_verifier("digit-class", {}, {})
    with pytest.raises(InvalidRequest, match=r"search\.verifier_options\.target"):
        build_verifier("ink-mass", {"target": 2.0})
    with pytest.raises(InvalidRequest, match="search.verifier"):
        build_verifier("text-words", {}, {}, kind="diffusion")
    for spec in SEARCHES.values():  # every option is documented and its default passes its own check
        for name, option in spec.options.items():
            assert option.help, (spec.name, name)
            option.check(f"search.options.{name}", option.default)
    with pytest.raises(InvalidRequest, match=r"search\.options\.nonsense: not an option"):
        _run("best_of_n", options={"nonsense": 1})


def test_verifiers_compute_what_they_say():
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.rand(3, 1, 8, 8) * 4 - 2
    labels = torch.tensor([1, 4, 9])
    expected = torch.log_softmax(clf(x.clamp(-1, 1)).double(), -1)[torch.arange(3), labels]
    torch.testing.assert_close(ClassLogProb(clf)(x, labels), expected)
    with pytest.raises(InvalidRequest, match="class label"):
        ClassLogProb(clf)(x, None)
    ink = torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0), torch.zeros(1, 8, 8)])
    torch.testing.assert_close(InkMass()(ink), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(InkMass(0.5)(ink), torch.tensor([-0.5, -0.5, 0.0], dtype=torch.float64))
    vocab = {" cat": [5], " big dog": [7, 8]}
    words = WordPresence.from_words(["cat", "big dog"], lambda w: vocab.get(w, []))
    tokens = torch.tensor([[1, 5, 2, 7, 8], [7, 1, 8, 1, 1], [1, 1, 1, 7, 8]])
    torch.testing.assert_close(words(tokens), torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    pts = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(COMPONENT(pts), MIXTURE.log_density(pts, 0.0, torch.full((5,), 3)))


def test_reward_searches_concentrate_more_mass_on_the_rewarded_component_than_best_of_n():
    """Verifier = exact log-density of component 3 of the (unconditional) 2-D GMM, 16 x T NFE, T = 10:
    EvoSearch, RBF and FK steering put more of their returned samples in that component, and more of them within one
    component std of its mean, than best-of-N with the same NFE.  FKC is reward-free (its weights come
    from the scores), so it is checked against exact targets in test_search_exact.py instead."""
    model = MIXTURE.denoiser(RectifiedFlow(), "velocity", conditional=False)
    verifier = build_verifier("gmm-component", {"component": 3}, {"mixture": MIXTURE})
    mu, sd = MIXTURE.means[3].double(), float(MIXTURE.stds[3])

    def masses(method, options):
        result = run_search(method, model, verifier=verifier, budget_nfe=160, seeds=list(range(32)), steps=10,
                            options=options)
        assert result.nfe <= 160
        x = result.samples.double()
        log_r, _ = MIXTURE._log_resp(x, torch.zeros(len(x), dtype=torch.float64), None)
        return (log_r.argmax(1) == 3).double().mean(), ((x - mu).norm(dim=1) < sd).double().mean()

    bon_region, bon_core = masses("best_of_n", {})
    # FK steering at lambda = 1: these rewards are log-densities spanning ~100 nats, where the code's
    # lambda = 10 (tuned for ImageReward's unit scale) collapses the particles on the first estimate.
    for method, options in [("evosearch", {}), ("rollover_budget_forcing", {"interpolant": "linear"}),
                            ("fk_steering", {"lam": 1.0})]:
        region, core = masses(method, options)
        assert region > bon_region, method
        assert core > bon_core + 0.15, method


class TinyMaskedModel:
    """A time-agnostic masked model over 5 tokens + mask: fixed position-dependent logits."""

    mask_id, vocab_size, length, forbidden = 5, 6, 8, (5,)

    def logits(self, tokens, cond=None):
        gen = torch.Generator().manual_seed(0)
        table = torch.randn(self.length, self.vocab_size, generator=gen)
        return table[: tokens.shape[1]].expand(tokens.shape[0], -1, -1).clone()


def test_best_of_n_masked_with_the_text_verifier():
    model = TinyMaskedModel()
    vocab = {" ab": [2, 3], " c": [4]}
    words = WordPresence.from_words(["ab", "c"], vocab.__getitem__)
    tokenizer = type("Tokenizer", (), {"encode": staticmethod(vocab.__getitem__)})
    verifier = build_verifier("text-words", {"words": ["ab", "c"]}, {"model": tokenizer})
    assert verifier == words
    one = run_search("best_of_n_masked", model, verifier=verifier, budget_nfe=8, seeds=[0, 1, 2], kind="masked")
    many = run_search("best_of_n_masked", model, verifier=verifier, budget_nfe=8 * 16, seeds=[0, 1, 2], kind="masked")
    assert one.nfe == 8 and many.nfe == 8 * 16 and many.verifier_calls == 16  # first_hitting: L NFE each
    assert many.samples.shape == (3, 8) and many.samples.dtype == torch.int64
    assert (many.rewards >= one.rewards).all() and many.rewards.mean() > one.rewards.mean()
    torch.testing.assert_close(many.rewards, verifier(many.samples))


def test_catalog_is_json_and_lists_every_method_and_verifier():
    import json

    from search import catalog

    c = json.loads(json.dumps(catalog()))
    assert {s["name"] for s in c["searches"]} == set(SEARCHES)
    assert {v["name"] for v in c["verifiers"]} == set(VERIFIERS)
    evo = next(s for s in c["searches"] if s["name"] == "evosearch")
    assert evo["options"]["mutation_rate"] == {"type": "float", "default": 0.3, "minimum": 0.0, "maximum": 1.0,
                                               "choices": None, "help": evo["options"]["mutation_rate"]["help"]}
    assert evo["options"]["evolution_steps"]["type"] == "list[int]"


def _official_evosearch(model, verifier, seed, steps, e, pops, elites, beta):
    """EvoSearch as the official code runs it (SD2.1/evo_pipe.py `generate` + `evosearch`, DDIM eta = 1),
    written out plainly on the VP process, drawing the same random streams in the same order as
    search/evosearch.py.  The archive of generation g holds the output of step e_g, the children re-enter the
    main loop as the input of step e_g, generation 0 mutates with sqrt(1 - beta^2) x + beta eps in model
    (VP) coordinates, later generations add the DDIM eta = 1 std of step e_g, the best x0 ever scored wins."""
    import math

    from samplers import run_sampler
    from search.core import Streams
    from search.trajectory import schedule

    streams, sig, n, shape = Streams([seed]), schedule(model, steps), len(e), tuple(model.shape)
    ends = list(e) + [steps]

    def seg(x, lo, hi):  # a segment's noise streams are drawn even when it is empty, as search/evosearch.py does
        noise = streams.particles(len(x), "sde")
        return run_sampler("ddpm", model, x, sig[lo:hi + 1], None, noise=noise)[0] if hi > lo else x

    def ddim_eta1_std(s, s_next):  # VE coordinates: the DDPM posterior std divided by alpha_next
        return s_next * math.sqrt(1 - s_next**2 / s**2)

    best = [-math.inf, None]

    def score(x0):
        r = verifier(x0).double()
        if float(r.max()) > best[0]:
            best[0], best[1] = float(r.max()), x0[int(r.argmax())]
        return r

    x = seg(streams.particles(pops[0], "initial").randn(shape) * math.sqrt(1 + float(sig[0]) ** 2), 0, e[0])
    archive, rewards = [[] for _ in e], [[] for _ in e]
    for g in range(n):
        y, at = x, e[g]
        for h in range(g, n):  # the full rollout from e_g, caching the output of every later evolution step
            y = seg(y, at, e[h] + 1)
            archive[h].append(y)
            at = e[h] + 1
        r = score(seg(y, at, steps))
        for h in range(g, n):
            rewards[h].append(r)
        pop, rew = torch.cat(archive[g]), torch.cat(rewards[g])
        k = pops[g + 1]
        m = min(elites, k, len(pop))
        parents = []
        for _ in range(k - m):  # tournament over floor(0.9 N) random archive members
            cand = torch.randperm(len(pop), generator=streams.selection[0])[: max(1, int(0.9 * len(pop)))]
            parents.append(pop[cand[rew[cand].argmax()]])
        children = pop[rew.topk(m).indices]
        if parents:
            eps = streams.particles(k - m, "mutation").randn(shape)
            level, s = float(sig[e[g] + 1]), float(sig[e[g]])
            if g == 0:  # alpha = 1 / sqrt(1 + sigma^2) on the VP process: eps / alpha in VE coordinates
                mutants = math.sqrt(1 - beta**2) * torch.stack(parents) + beta * math.sqrt(1 + level**2) * eps
            else:
                mutants = torch.stack(parents) + ddim_eta1_std(s, level) * eps
            children = torch.cat([children, mutants])
        x = seg(children, e[g], ends[g + 1])  # one level cleaner than the model is told, as in the code
    score(x)
    return best[1]


@pytest.mark.parametrize("evolution_steps", [[], [2, 5, 7]])
def test_evosearch_code_convention_reproduces_the_official_recursion(evolution_steps):
    model = MIXTURE.denoiser(DiscreteVP.from_schedule(), "eps", conditional=False)
    options = {"convention": "code", "sampler": "ddpm", "elites": 2, "mutation_rate": 0.2,
               "evolution_steps": evolution_steps}
    result = run_search("evosearch", model, verifier=COMPONENT, budget_nfe=200, seeds=[3, 4], steps=10,
                        options=options)
    e, pops = evo_plan(200, 10, 4, 2.0, tuple(evolution_steps))
    assert result.nfe == evo_nfe(e, pops, 10)
    for i, seed in enumerate((3, 4)):
        expected = _official_evosearch(model, COMPONENT, seed, 10, e, pops, elites=2, beta=0.2)
        torch.testing.assert_close(result.samples[i], expected.to(result.samples.dtype))
