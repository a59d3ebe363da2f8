"""The engine's step loop: every request kind is batched, errors stay with their calls, batch composition does
not change results, and every entry point accepts and rejects the same requests (one plan)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from models.config import ModelEntry, load_config
from models.loading import LoadedModel, load_model
from samplers.denoiser import Denoiser
from samplers.errors import Cancelled, InvalidRequest
from samplers.gmm import gmm_image
from server.config import ServerConfig
from server.engine import Engine
from server.generation import GenerateRequest, SearchRequest, generate
from server.plan import Limits, make_plan
from tests.queue_fixtures import jobs_server, jpb, redis_server, settings
from tests.server_fixtures import PROCESS, gmm_model, pb

ZOO = load_config()


def _engine(models: dict, **settings) -> Engine:
    engine = Engine(models, replace(ServerConfig(port=0, metrics_port=None), **settings))
    engine.warm_up()
    return engine


def _concurrently(engine, name, requests):
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: engine.generate(name, r).result, requests))


@pytest.fixture(scope="module")
def meanflow():
    return load_model(ZOO["digits-meanflow"])


def test_meanflow_requests_reach_the_step_loop_with_any_sampler(meanflow):
    """The old batcher bound `as_flow_denoiser()` to the unbatched model: a 5-step euler request on a MeanFlow
    model ran no batched forward at all.  Now every call of every sampler goes through the loop."""
    engine = _engine({"mf": meanflow})
    try:
        loop = engine.models["mf"].loop
        before = loop.forwards
        engine.generate("mf", GenerateRequest("euler", 5, n=1, class_label=3))
        assert loop.forwards - before == 5
        before = loop.forwards
        requests = [GenerateRequest(s, 4, n=1, class_label=k) for k, s in enumerate(["euler", "meanflow"] * 4)]
        _concurrently(engine, "mf", requests)
        # flow samplers (u(z, t, t)) and MeanFlow (u(z, r, t)) call the same network: they share forwards
        assert loop.forwards - before < 8 * 4
    finally:
        engine.close()


def _poisoned(name="poison", bad_label=7):
    """A served GMM whose network raises whenever its batch holds a sample of class `bad_label`."""
    exact = gmm_image().denoiser(PROCESS, "eps")

    def net(x_t, t, labels=None):
        if labels is not None and bool((labels == bad_label).any()):
            raise RuntimeError("poisoned batch")
        time.sleep(0.002)  # long enough for concurrent requests to share forwards
        return exact.net(x_t, t, labels)

    return LoadedModel(ModelEntry(name, Path("."), "diffusion", "dpmpp_2m", 10, 2.0),
                       Denoiser(net, PROCESS, "eps", exact.shape, exact.num_classes))


def test_a_failing_forward_fails_only_its_own_calls_and_hangs_nothing():
    engine = _engine({"poison": _poisoned()})
    try:
        loop = engine.models["poison"].loop
        labels = [1, 7, 2, 3, 7, 4, 5, 6]
        requests = [GenerateRequest("dpmpp_2m", 6, n=2, class_label=c, seed=k) for k, c in enumerate(labels)]
        outcomes = [None] * len(requests)

        def run(k):
            try:
                outcomes[k] = engine.generate("poison", requests[k]).result
            except RuntimeError as err:
                outcomes[k] = err

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a request hung"
        for c, outcome in zip(labels, outcomes):
            if c == 7:
                assert isinstance(outcome, RuntimeError) and "poisoned batch" in str(outcome)
            else:  # its batch-mates ran again without the poisoned call and got their exact solo results
                solo = generate(engine.models["poison"].loaded, requests[labels.index(c)])
                assert torch.equal(outcome.samples, solo.samples)
        assert loop.forwards > 0 and not loop._active
    finally:
        engine.close()


def test_results_do_not_depend_on_batch_composition_for_float64_networks():
    """Exact batch invariance: the float64 mixture gives bit-for-bit the solo result inside any batch."""
    engine = _engine({"gmm": gmm_model()})
    try:
        jobs = [GenerateRequest(s, n, n=1 + k % 3, seed=10 * k, class_label=k % 10, guidance=[1.0, 2.0, 4.0][k % 3])
                for k, (s, n) in enumerate([("dpmpp_2m", 6), ("euler", 4), ("unipc", 9), ("ddpm", 5)] * 4)]
        together = _concurrently(engine, "gmm", jobs)
        loaded = engine.models["gmm"].loaded
        for job, out in zip(jobs, together):
            solo = generate(loaded, job)
            assert float((out.samples - solo.samples).abs().max()) <= 1e-12
    finally:
        engine.close()


def test_cancel_stops_a_request_between_steps_and_its_batch_mates_finish():
    engine = _engine({"slow": gmm_model("slow", delay=0.02)})
    try:
        cancel = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            doomed = pool.submit(engine.generate, "slow", GenerateRequest("euler", 200, n=1), cancel=cancel)
            mate = pool.submit(engine.generate, "slow", GenerateRequest("euler", 20, n=1))
            time.sleep(0.2)
            cancel.set()
            with pytest.raises(Cancelled):
                doomed.result(timeout=5)
            assert mate.result(timeout=30).result.samples.shape == (1, 1, 8, 8)
        assert engine.drain(1.0)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def text_mdm():
    return load_model(ZOO["text-mdm"])


def _bad_requests(meanflow, text_mdm):
    return [
        (gmm_model(), GenerateRequest("dpmpp_2m", 5, grid="nope"), "grid"),
        (text_mdm, GenerateRequest("first_hitting", None, class_label=3), "class_label"),
        (text_mdm, GenerateRequest("first_hitting", None, prompt_tokens=(5,) * 501), "prompt_tokens"),
        (meanflow, GenerateRequest("meanflow", 1, class_label=3, guidance=2.0), "guidance"),
        (gmm_model(), GenerateRequest("dpmpp_2m", 5, class_label=3, search=SearchRequest("best_of_n", 40, "nope")),
         "search.verifier"),
        (gmm_model(), GenerateRequest("dpmpp_2m", 0), "steps"),
        (gmm_model(), GenerateRequest("dpmpp_2m", 5, n=0), "num_samples"),
        (gmm_model(), GenerateRequest("dpmpp_2m", 5, n=257), "num_samples"),
    ]


def test_every_entry_point_refuses_the_same_requests(meanflow, text_mdm):
    """The in-process CLI path (`generate` with the config's server limits), the engine (Generate, and a job
    submission: engine.plan) share one plan: each bad request is refused by all with the same message,
    before any compute."""
    for loaded, request, field in _bad_requests(meanflow, text_mdm):
        messages = []
        engine = Engine({loaded.name: loaded}, ServerConfig(port=0, metrics_port=None))
        try:
            entry_points = ((generate, (loaded, request, None, None, None, Limits())),
                            (make_plan, (loaded, request, Limits())), (engine.plan, (loaded.name, request)))
            for run, args in entry_points:
                with pytest.raises(InvalidRequest) as info:
                    run(*args)
                messages.append(str(info.value))
        finally:
            engine.close()
        assert len(set(messages)) == 1 and messages[0].startswith(field), messages


def test_submit_job_refuses_at_submission_what_generate_refuses(tmp_path, meanflow, text_mdm):
    """Over gRPC: SubmitJob used to queue these (they then failed in the worker)."""
    cases = [
        ("gmm", dict(grid="nope"), "grid"),
        ("text-mdm", dict(class_label=3), "class_label"),
        ("text-mdm", dict(prompt_tokens=[5] * 501), "prompt_tokens"),
        ("digits-meanflow", dict(sampler="meanflow", steps=1, class_label=3, guidance=2.0), "guidance"),
        ("gmm", dict(class_label=3, search=pb.SearchSpec(method="best_of_n", budget_nfe=40, verifier="nope")),
         "search.verifier"),
    ]
    with redis_server(tmp_path / "redis") as redis:
        config = settings(redis.url)
        models = {"gmm": gmm_model(), "text-mdm": text_mdm, "digits-meanflow": meanflow}
        with jobs_server(models, config) as (stub, store, address):
            channel = grpc.insecure_channel(address)
            generate_stub = pb_grpc_stub(channel)
            for model, fields, fragment in cases:
                request = pb.GenerateRequest(model=model, **fields)
                with pytest.raises(grpc.RpcError) as gen:
                    generate_stub.Generate(request)
                with pytest.raises(grpc.RpcError) as job:
                    stub.SubmitJob(jpb.SubmitJobRequest(request=request))
                for err in (gen.value, job.value):
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(fragment)
                assert gen.value.details() == job.value.details()
            assert store.redis.keys(f"{store.keys.prefix}:job:*") == []
            channel.close()


def pb_grpc_stub(channel):
    from tests.server_fixtures import pb_grpc

    return pb_grpc.DiffserveStub(channel)


def test_a_malformed_network_call_fails_only_its_own_request():
    """A machine that yields a call the loop cannot batch (no per-sample tensor) ends alone."""
    from samplers.calls import NetworkCall
    from server.engine import Request, StepLoop
    from server.plan import Plan

    def broken():
        yield NetworkCall(lambda: None, ())

    def fine():
        out = yield NetworkCall(lambda x: x * 2, (torch.ones(2, 3),))
        return out

    loop = StepLoop("test", max_batch=8)
    try:
        plan = Plan("test", "diffusion", GenerateRequest("euler", 1), (0,))
        bad, good = Request(plan, broken(), None, None), Request(plan, fine(), None, None)
        for r in (bad, good):
            loop.submit(r)
        assert bad.done.wait(5) and good.done.wait(5)
        assert isinstance(bad.error, ValueError) and good.error is None
        assert torch.equal(good.result, torch.full((2, 3), 2.0))
    finally:
        loop.stop()
