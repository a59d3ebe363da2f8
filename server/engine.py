"""The engine: loaded models, one batcher per model, admission, deadlines and cancellation.  No gRPC here.

A request runs in a compute thread; every network call it makes goes through its model's Batcher, so all
requests on a model share forward passes whatever their sampler, steps or guidance.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from models.config import lookup
from samplers.errors import Cancelled, DeadlineExceeded, InvalidRequest

from . import metrics
from .batching import BatchedMaskedModel, BatchedModel, Batcher
from .config import ServerConfig
from .errors import NotReady, QueueFull, status_of
from .generation import GenerateRequest, GenerateResult, generate

log = logging.getLogger("diffserve.engine")


@dataclass(frozen=True)
class EngineResult:
    result: GenerateResult
    sampler: str
    queue_seconds: float
    compute_seconds: float


class ServedModel:
    """A loaded model with its batcher, readiness and admission count (engine-owned, not per request)."""

    def __init__(self, loaded, config: ServerConfig):
        self.loaded = loaded
        base = loaded.model
        if loaded.kind == "masked":
            self.batcher = Batcher(base.logits, loaded.name, config.max_batch)
            self.model = BatchedMaskedModel(base, self.batcher)
        else:
            self.batcher = Batcher(base, loaded.name, config.max_batch)
            self.model = BatchedModel(base, self.batcher)
        self.ready = False
        self.admitted = 0
        self.backend = getattr(loaded, "backend", "torch")


class Engine:
    def __init__(self, loaded_models: dict, config: ServerConfig, resources: dict | None = None):
        self.config = config
        self.resources = dict(resources or {})  # what verifiers need: loaded classifiers, ...
        self.entries = {name: m.entry for name, m in loaded_models.items()}
        self.models = {name: ServedModel(m, config) for name, m in loaded_models.items()}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="compute")
        self._accepting = True
        self._inflight = 0
        self._idle = threading.Condition(self._lock)

    # lifecycle
    def warm_up(self) -> None:
        """One tiny request per model through its batcher, then mark it ready."""
        for name, served in self.models.items():
            entry = served.loaded.entry
            steps = None if entry.kind == "masked" and entry.default_sampler == "first_hitting" else 1
            try:
                generate(served.loaded, GenerateRequest(entry.default_sampler, steps, n=1), model=served.model)
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
        self._executor.shutdown(wait=False, cancel_futures=True)
        for served in self.models.values():
            served.batcher.stop()

    # requests
    def model_info(self, name: str):
        entry = lookup(self.entries, name)
        return entry, self.models[name]

    def _admit(self, name: str, request: GenerateRequest) -> ServedModel:
        entry, served = self.model_info(name)
        if not self._accepting:
            raise NotReady("the server is shutting down; retry on another replica")
        if not served.ready:
            raise NotReady(f"model {name!r} is not ready yet")
        if not 1 <= request.n <= self.config.max_samples:
            raise InvalidRequest(f"num_samples: {request.n} is outside [1, {self.config.max_samples}]")
        if request.steps is not None and not 1 <= request.steps <= self.config.max_steps:
            raise InvalidRequest(f"steps: {request.steps} is outside [1, {self.config.max_steps}]")
        with self._lock:
            if served.admitted >= self.config.max_queue:
                raise QueueFull(f"model {name!r} has {served.admitted} requests queued; retry later")
            served.admitted += 1
            self._inflight += 1
        return served

    def _release(self, served: ServedModel) -> None:
        with self._idle:
            served.admitted -= 1
            self._inflight -= 1
            self._idle.notify_all()

    def generate(self, name: str, request: GenerateRequest, *, on_step: Callable[[Any], None] | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None) -> EngineResult:
        """Admit, run in a compute thread, wait; raises domain errors (mapped to status codes by the server).

        `on_step` sees a StepInfo per sampler step, or a search.SearchProgress for searches."""
        start = time.monotonic()
        served = self._admit(name, request)
        sampler = request.sampler or served.loaded.entry.default_sampler
        status = "error"
        metrics.QUEUED.labels(name).inc()
        try:
            future = self._executor.submit(self._compute, served, request, sampler, start, on_step, cancel, deadline)
            out = future.result()
            status = "ok"
            metrics.NFE.labels(name, sampler).inc(out.result.nfe)
            metrics.SAMPLES.labels(name).inc(len(out.result.seeds))
            return out
        except BaseException as err:
            status = status_of(err)[0].name.lower()
            raise
        finally:
            self._release(served)
            metrics.REQUESTS.labels(name, sampler if sampler in _known_samplers() else "other", status).inc()
            metrics.REQUEST_SECONDS.labels(name).observe(time.monotonic() - start)

    def _compute(self, served, request, sampler, admitted_at, on_step, cancel, deadline) -> EngineResult:
        name = served.loaded.name
        metrics.QUEUED.labels(name).dec()
        began = time.monotonic()
        metrics.QUEUE_SECONDS.labels(name).observe(began - admitted_at)
        metrics.INFLIGHT.labels(name).inc()

        def hook(info) -> None:
            _check(cancel, deadline)
            if on_step is not None:
                on_step(info)

        try:
            _check(cancel, deadline)  # refuse work that was cancelled or ran late while queued
            full = GenerateRequest(**{**request.__dict__, "sampler": sampler})
            result = generate(served.loaded, full, hook=hook, model=served.model, resources=self.resources)
        finally:
            metrics.INFLIGHT.labels(name).dec()
        compute = time.monotonic() - began
        metrics.COMPUTE_SECONDS.labels(name).observe(compute)
        return EngineResult(result, sampler, began - admitted_at, compute)


def _check(cancel: threading.Event | None, deadline: float | None) -> None:
    """Stop a request at the next step once it is cancelled or past its deadline."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("the request was cancelled")
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the request's deadline passed")


def _known_samplers():
    from samplers import REGISTRY
    return REGISTRY
