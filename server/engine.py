"""The engine: loaded models, admission, and one step loop per model that batches every running request.

A request becomes a plan (server/plan.py) and the plan a step machine (samplers/calls.py): a generator
that yields each network call it needs and receives the result.  Each model has one `StepLoop` thread
(vLLM's schedule / execute / update):

    collect  the pending calls of all active requests, grouped by network and per-sample layout
    execute  one forward pass per group (up to max_batch samples; CFG's two halves are rows of one call)
    return   each request its rows; advance its machine to its next call, or finish it

Cancellation, deadlines and shutdown are checked by the loop between steps.  No thread per request and
no future per network call: a caller waits on its request's own `done` event.  No gRPC here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from models.config import lookup
from samplers import REGISTRY
from samplers.calls import NetworkCall
from samplers.errors import Cancelled, DeadlineExceeded
from search import SEARCHES

from . import metrics
from .config import ServerConfig
from .errors import NotReady, QueueFull, status_of
from .layout import batch_key, concat, rows, split
from .plan import Limits, Plan, make_plan, takes_prompt
from .requests import GenerateRequest, GenerateResult

log = logging.getLogger("diffserve.engine")


@dataclass(frozen=True)
class EngineResult:
    result: GenerateResult
    sampler: str
    queue_seconds: float
    compute_seconds: float


@dataclass(eq=False)
class Request:
    """One admitted request inside a step loop: its machine, the call it waits on, how it ends."""

    plan: Plan
    machine: Any
    cancel: threading.Event | None
    deadline: float | None
    admitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    call: NetworkCall | None = None
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[], None] | None = None

    def stop_reason(self) -> BaseException | None:
        # the deadline first: an RPC that ran out of time also fires its cancel event
        if self.deadline is not None and time.monotonic() > self.deadline:
            return DeadlineExceeded("the request's deadline passed")
        if self.cancel is not None and self.cancel.is_set():
            return Cancelled("the request was cancelled")
        return None


def warm_up_request(loaded) -> GenerateRequest:
    """The smallest request a model takes: one sample, one step (masked FHS: its own steps), its input."""
    entry, model = loaded.entry, loaded.model
    if entry.kind == "block_diffusion":  # one step of one canvas after a short prompt
        return GenerateRequest(entry.default_sampler, 1, n=1, prompt="warm-up", max_new_tokens=model.canvas_length)
    if entry.kind == "masked":
        steps = None if REGISTRY[entry.default_sampler].one_step_per_mask else 1
        if takes_prompt(model) and len(model.prompt_ids("warm-up")) + 32 <= model.length:
            # a text LM: a short answer (one block of LLaDA's default 32), not FHS over all of MDLM's 1024 positions
            return GenerateRequest(entry.default_sampler, steps, n=1, prompt="warm-up", max_new_tokens=32)
        return GenerateRequest(entry.default_sampler, steps, n=1)
    if entry.family is not None:  # a latent pipeline: a prompt or a class label
        return GenerateRequest(entry.default_sampler, 1, n=1, prompt="warm-up" if model.takes_prompt else None,
                               class_label=None if model.takes_prompt else 0)
    return GenerateRequest(entry.default_sampler, 1, n=1)


class StepLoop:
    """One model's loop thread: admits requests, batches their network calls, advances their machines."""

    def __init__(self, name: str, max_batch: int):
        self.name, self.max_batch = name, max_batch
        self.forwards = 0  # forward passes run (tests and benchmarks read it)
        self._threads = torch.get_num_threads()  # the creator's: OpenMP gives a new thread its own default
        self._inbox: list[Request] = []
        self._active: list[Request] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"step-loop-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cv:
            if self._stopped:
                raise NotReady("the server is shutting down; retry on another replica")
            self._inbox.append(request)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        torch.set_num_threads(self._threads)  # the same float reductions as a library call in the creating thread
        while True:
            with self._cv:
                while not self._inbox and not self._active and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    break
                new, self._inbox = self._inbox, []
            try:
                for request in new:
                    self._start(request)
                for group in self._collect():
                    self._execute(group)
            except BaseException as err:  # a bug in the loop itself: fail everything rather than hang it
                log.exception("step loop of %s failed", self.name)
                for request in list(self._active):
                    self._finish(request, error=err)
        for request in self._active + self._inbox:
            self._finish(request, error=NotReady("the server is shutting down; retry on another replica"))

    # collect / execute / return
    def _start(self, request: Request) -> None:
        request.started = time.monotonic()
        metrics.QUEUED.labels(self.name).dec()
        metrics.QUEUE_SECONDS.labels(self.name).observe(request.started - request.admitted)
        metrics.INFLIGHT.labels(self.name).inc()
        self._active.append(request)
        self._advance(request, None, first=True)

    def _collect(self) -> list[list[Request]]:
        """The active requests grouped by (network, layout) of their pending call, oldest first, each
        group cut at max_batch samples (the rest wait for the next round).  Stopped requests leave here."""
        groups: dict[Any, list[Request]] = {}
        sizes: dict[Any, int] = {}
        for request in list(self._active):
            reason = request.stop_reason()
            if reason is not None:
                request.machine.close()
                self._finish(request, error=reason)
                continue
            try:
                key, n = batch_key(request.call), rows(request.call)
            except Exception as err:  # a malformed call ends its own request, not the loop
                request.machine.close()
                self._finish(request, error=err)
                continue
            if key in groups and sizes[key] + n > self.max_batch:
                continue
            groups.setdefault(key, []).append(request)
            sizes[key] = sizes.get(key, 0) + n
        return list(groups.values())

    def _execute(self, group: list[Request]) -> None:
        """One forward pass for the group; on failure each call runs alone, so an error stays with its call."""
        calls = [r.call for r in group]
        start = time.perf_counter()
        try:
            out = calls[0].network(*concat([c.args for c in calls]))
            parts = split(out, [rows(c) for c in calls])
        except Exception as err:
            if len(group) == 1:
                self._advance(group[0], error=err)
                return
            for request in group:
                self._execute([request])
            return
        self.forwards += 1
        metrics.FORWARD_SECONDS.labels(self.name).observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels(self.name).observe(sum(rows(c) for c in calls))
        for request, part in zip(group, parts):
            self._advance(request, part)

    def _advance(self, request: Request, part: Any = None, *, first: bool = False,
                 error: BaseException | None = None) -> None:
        """Hand a request its rows (or its error) and run its machine to its next call."""
        try:
            if error is not None:
                request.call = request.machine.throw(error)
            elif first:
                request.call = next(request.machine)
            else:
                request.call = request.machine.send(request.call.complete(part))
        except StopIteration as stop:
            self._finish(request, result=stop.value)
        except BaseException as err:  # the request's own error (bad input, NaN, cancelled by its hook)
            self._finish(request, error=err)

    def _finish(self, request: Request, *, result: Any = None, error: BaseException | None = None) -> None:
        if request.started is None:  # refused before it ever ran (shutdown)
            metrics.QUEUED.labels(self.name).dec()
        elif request in self._active:
            self._active.remove(request)
            metrics.INFLIGHT.labels(self.name).dec()
        request.result, request.error = result, error
        request.done.set()
        if request.on_done is not None:
            request.on_done()


class Ticket:
    """A submitted request as its caller sees it: wait for the result; metrics are recorded once here."""

    def __init__(self, engine: Engine, name: str, asked: GenerateRequest):
        self.engine, self.name, self.asked, self.start = engine, name, asked, time.monotonic()
        self.plan: Plan | None = None
        self.served: ServedModel | None = None
        self.request: Request | None = None
        self.nfe = [0]  # NFE reported so far by the hook: failed and cancelled work counts too
        self.waited, self.outcome = False, None

    @property
    def label(self) -> str:
        """The sampler or search method, for metrics: only registered names (labels stay bounded)."""
        if self.plan is not None:
            return self.plan.label
        search = self.asked.search
        name = search.method if search is not None else self.asked.sampler
        return name if name in (SEARCHES if search is not None else REGISTRY) else "other"

    def refuse(self, err: BaseException) -> None:
        """Count a request refused before it ran (bad request, unknown model, full queue, not ready)."""
        metrics.REQUESTS.labels(self.name if self.name in self.engine.models else "other", self.label,
                                status_of(err)[0].name.lower()).inc()

    def abandon(self) -> None:
        """The caller went away (a stream closed early): settle the request without raising."""
        if not self.waited:
            try:
                self.wait()
            except Exception:  # the caller is gone; the outcome was counted by wait()
                pass

    def wait(self) -> EngineResult:
        request, name = self.request, self.name
        request.done.wait()
        if self.waited:
            if request.error is not None:
                raise request.error
            return self.outcome
        self.waited = True
        self.engine._release(self.served)
        began = request.started if request.started is not None else request.admitted
        compute = time.monotonic() - began
        metrics.COMPUTE_SECONDS.labels(name).observe(compute)
        metrics.REQUEST_SECONDS.labels(name).observe(time.monotonic() - self.start)
        if request.error is not None:
            metrics.NFE.labels(name, self.label).inc(self.nfe[0])
            metrics.REQUESTS.labels(name, self.label, status_of(request.error)[0].name.lower()).inc()
            raise request.error
        metrics.NFE.labels(name, self.label).inc(request.result.nfe)
        metrics.SAMPLES.labels(name).inc(len(request.result.seeds))
        metrics.REQUESTS.labels(name, self.label, "ok").inc()
        self.outcome = EngineResult(request.result, self.label, began - request.admitted, compute)
        return self.outcome


class ServedModel:
    """A loaded model with its step loop, readiness and admission count (engine-owned, not per request)."""

    def __init__(self, loaded, config: ServerConfig):
        self.loaded = loaded
        self.loop = StepLoop(loaded.name, config.max_batch)
        self.ready = False
        self.admitted = 0
        self.backend = getattr(loaded, "backend", "torch")


class Engine:
    def __init__(self, loaded_models: dict, config: ServerConfig, resources: dict | None = None):
        self.config = config
        self.limits = Limits.of(config)
        self.resources = dict(resources or {})  # what verifiers need: loaded classifiers, ...
        self.entries = {name: m.entry for name, m in loaded_models.items()}
        self.models = {name: ServedModel(m, config) for name, m in loaded_models.items()}
        self._lock = threading.Lock()
        self._accepting = True
        self._inflight = 0
        self._idle = threading.Condition(self._lock)

    # lifecycle
    def warm_up(self) -> None:
        """One tiny request per model through its step loop, then mark it ready."""
        for name, served in self.models.items():
            try:
                self._run_warm_up(name, warm_up_request(served.loaded))
            except Exception:  # a model that cannot warm up stays NOT_SERVING; the others serve
                log.exception("model %s failed its warm-up request and stays unavailable", name)
                continue
            served.ready = True
            metrics.MODEL_READY.labels(name).set(1)
            log.info("model %s ready", name)

    def ready(self, name: str | None = None) -> bool:
        if not self._accepting:
            return False
        if name is None:
            return all(m.ready for m in self.models.values())
        return name in self.models and self.models[name].ready

    def begin_shutdown(self) -> None:
        self._accepting = False
        for name in self.models:
            metrics.MODEL_READY.labels(name).set(0)

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight (or `timeout`); True when drained."""
        end = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        for served in self.models.values():
            served.loop.stop()

    # requests
    def model_info(self, name: str):
        entry = lookup(self.entries, name)
        return entry, self.models[name]

    def plan(self, name: str, request: GenerateRequest, *, output: str | None = None, png_scale: int = 1,
             job: bool = False) -> Plan:
        """The validated plan of `request` on model `name` (what every entry point checks before compute)."""
        _, served = self.model_info(name)
        limits = Limits.of(self.config, job=True) if job else self.limits
        return make_plan(served.loaded, request, limits, output=output, png_scale=png_scale, resources=self.resources)

    def generate(self, name: str, request: GenerateRequest, *, on_step: Callable[[Any], None] | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None,
                 output: str | None = None, png_scale: int = 1) -> EngineResult:
        """Plan, admit, run in the model's step loop, wait; raises domain errors (mapped to status codes by
        the server).  `on_step` sees a StepInfo per sampler step, or a search.SearchProgress for searches;
        it runs in the loop thread and must be quick."""
        return self.submit(name, request, on_step=on_step, cancel=cancel, deadline=deadline, output=output,
                           png_scale=png_scale).wait()

    def submit(self, name: str, request: GenerateRequest, *, on_step: Callable[[Any], None] | None = None,
               on_done: Callable[[], None] | None = None, cancel: threading.Event | None = None,
               deadline: float | None = None, output: str | None = None, png_scale: int = 1) -> Ticket:
        """Plan and admit `request` and hand it to the model's step loop; `Ticket.wait()` gives its result.
        `on_done` runs (in the loop thread) when it ends, however it ends."""
        ticket = Ticket(self, name, request)
        try:
            _, served = self.model_info(name)
            ticket.plan = self.plan(name, request, output=output, png_scale=png_scale)
            self._admit(served)
        except BaseException as err:
            ticket.refuse(err)
            raise
        ticket.served = served
        loaded, nfe = served.loaded, ticket.nfe

        def hook(info) -> None:
            nfe[0] = getattr(info, "nfe", nfe[0])
            if on_step is not None:
                on_step(info)

        machine = ticket.plan.machine(loaded, loaded.model, hook, self.resources)
        ticket.request = Request(ticket.plan, machine, cancel, deadline, on_done=on_done)
        metrics.QUEUED.labels(name).inc()
        try:
            served.loop.submit(ticket.request)
        except BaseException as err:
            metrics.QUEUED.labels(name).dec()
            self._release(served)
            ticket.refuse(err)
            raise
        return ticket

    def _run_warm_up(self, name: str, request: GenerateRequest) -> None:
        """A request straight into the loop: not admitted, not counted in the request metrics."""
        loaded = self.models[name].loaded
        plan = self.plan(name, request)
        warm = Request(plan, plan.machine(loaded, loaded.model, None, self.resources), None, None)
        metrics.QUEUED.labels(name).inc()
        self.models[name].loop.submit(warm)
        warm.done.wait()
        if warm.error is not None:
            raise warm.error

    def _admit(self, served: ServedModel) -> None:
        if not self._accepting:
            raise NotReady("the server is shutting down; retry on another replica")
        if not served.ready:
            raise NotReady(f"model {served.loaded.name!r} is not ready yet")
        with self._lock:
            if served.admitted >= self.config.max_queue:
                raise QueueFull(f"model {served.loaded.name!r} has {served.admitted} requests queued; retry later")
            served.admitted += 1
            self._inflight += 1

    def _release(self, served: ServedModel) -> None:
        with self._idle:
            served.admitted -= 1
            self._inflight -= 1
            self._idle.notify_all()
