"""Best-of-N with a text verifier on a chat LM's prompt (tiny random LLaDA): the search samples the answer after
the chat-templated prompt, the verifier scores the answer only, and gRPC gives what the plan gives."""

import pytest
import torch

from samplers.calls import drive
from samplers.errors import BudgetExceeded, InvalidRequest
from samplers.masked import run_masked_sampler
from samplers.registry import CallCounter
from search import run_search
from search.budget import Budget
from search.core import Streams
from search.verifiers import WordPresence
from server.plan import Limits, make_plan
from server.requests import GenerateRequest, SearchRequest
from tests.server_fixtures import pb
from tests.test_llada_served import served  # noqa: F401  (the tiny LLaDA behind a real gRPC server)

WORDS = ["w5", "w7"]  # w5 is in the prompt: scoring the prompt would give every candidate at least 0.5
PROMPT, NEW, SEEDS, BUDGET = "w5 w6", 8, [3, 4, 5, 6], 4 * 8  # first_hitting: 8 NFE per answer, N = 4


def _request(**search_options) -> GenerateRequest:
    search = SearchRequest("best_of_n_masked", BUDGET, "text-words", dict(search_options), {"words": WORDS})
    return GenerateRequest(sampler="first_hitting", steps=None, n=len(SEEDS), seed=SEEDS[0], prompt=PROMPT,
                           max_new_tokens=NEW, search=search)


def _searched(loaded, **search_options):
    plan = make_plan(loaded, _request(**search_options), Limits(), resources={})
    return drive(plan.machine(loaded, loaded.model, None, {}))


def test_best_of_n_samples_the_answer_and_scores_it_without_the_prompt(served):  # noqa: F811
    _, _, loaded, _ = served
    lm = loaded.model
    prompt = lm.chat_ids([{"role": "user", "content": PROMPT}])
    start = len(prompt)
    result = _searched(loaded)
    assert result.samples.shape == (len(SEEDS), start + NEW) and result.nfe == BUDGET
    assert (result.samples[:, :start] == torch.tensor(prompt)).all() and not (result.samples == lm.mask_id).any()
    assert result.texts == [lm.decode(row[start:]) for row in result.samples]
    verifier = WordPresence.from_words(WORDS, lm.encode)
    answers, whole = verifier(result.samples[:, start:]), verifier(result.samples)
    assert result.rewards == answers.tolist()
    assert (whole >= 0.5).all() and (answers < whole).any()  # the prompt alone would have earned reward

    # The N candidates, drawn independently from the search's own streams: the search returns each search's best
    template = torch.tensor(prompt + [lm.mask_id] * NEW).expand(len(SEEDS) * 4, -1).clone()
    candidates, _ = run_masked_sampler("first_hitting", lm, template, noise=Streams(SEEDS).particles(4, "masked"))
    scores = verifier(candidates[:, start:]).reshape(len(SEEDS), 4)
    best = scores.argmax(1)
    assert torch.equal(scores.max(1).values, answers)
    assert torch.equal(candidates.reshape(len(SEEDS), 4, -1)[torch.arange(len(SEEDS)), best], result.samples)


def test_mdlm_search_and_a_length_that_contradicts_the_prompt(served):  # noqa: F811
    _, _, loaded, _ = served
    result = _searched(loaded, sampler="mdlm")
    assert result.samples.shape[1] == 2 + NEW and result.nfe <= BUDGET
    with pytest.raises(InvalidRequest, match="search.options.length"):
        _searched(loaded, length=30)


def test_search_on_a_chat_prompt_over_grpc_equals_the_plan(served):  # noqa: F811
    _, stub, loaded, _ = served
    spec = pb.SearchSpec(method="best_of_n_masked", budget_nfe=BUDGET, verifier="text-words")
    spec.verifier_options.update({"words": WORDS})
    out = stub.Generate(pb.GenerateRequest(model="tiny-llada", prompt=PROMPT, max_new_tokens=NEW,
                                           num_samples=len(SEEDS), base_seed=SEEDS[0], search=spec, format=pb.TEXT))
    want = _searched(loaded)
    assert [s.text for s in out.samples] == want.texts and [s.reward for s in out.samples] == want.rewards
    assert out.nfe == BUDGET and [s.seed for s in out.samples] == SEEDS


def test_the_budget_pools_a_masked_samplers_uneven_rows():
    budget = Budget(limit=5, searches=2)
    budget.charge_pooled(3)
    budget.charge_pooled(5)
    assert (budget.nfe, budget.rows) == (4, 8)  # ceil(8 / 2): the mean per search
    with pytest.raises(BudgetExceeded):
        budget.charge_pooled(3)  # ceil(11 / 2) = 6 > 5: refused before spending
    assert (budget.nfe, budget.rows) == (4, 8)


def test_cached_mdlm_search_is_charged_the_rows_the_network_received(served):  # noqa: F811
    _, _, loaded, _ = served
    lm = loaded.model
    counter = CallCounter(lm)
    template = torch.tensor(lm.chat_ids([{"role": "user", "content": PROMPT}]) + [lm.mask_id] * NEW)
    result = run_search("best_of_n_masked", counter, verifier=WordPresence.from_words(WORDS, lm.encode),
                        budget_nfe=BUDGET, cond={"tokens": template.expand(len(SEEDS), -1)}, seeds=SEEDS, steps=30,
                        options={"sampler": "mdlm"}, kind="masked")
    assert result.nfe == -(-counter.rows // len(SEEDS)) < BUDGET  # the rows received, pooled; cached calls skipped
    assert result.network_passes == result.nfe and result.verifier_calls == BUDGET // NEW
