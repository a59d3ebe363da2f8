"""The queue worker: take tasks from the streams and run each through the engine, so tasks batch together
exactly as concurrent Generate requests do.

At-least-once: an entry stays in the group's pending list until the script that stores its result also
acknowledges it.  A worker that dies leaves its entries pending; live workers reclaim them with XAUTOCLAIM
once they have been idle for the visibility timeout (a live worker keeps its own entries fresh with
heartbeats, so long tasks are never reclaimed).  Every start counts as an attempt; a task that failed (or
whose worker died) `max_attempts` times goes to the dead-letter stream and fails its job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis

from samplers.errors import Cancelled, DiffservError, InvalidRequest

from .. import protogen
from .. import queue_metrics as qm
from ..errors import NotReady, QueueFull, status_of
from . import codec
from .connection import CONNECTION_ERRORS, Backoff, Stopped, redact, retry_forever
from .tasks import TaskEntry, TaskQueue

log = logging.getLogger("diffserve.worker")
DIED = "its worker stopped responding while running it (killed, crashed or cut off from Redis)"


@dataclass
class Held:
    """A task this worker holds (delivered to it, not yet acknowledged)."""

    entry: TaskEntry
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = ""            # why cancel is set: "ended" (job cancelled or failed) or "shutdown"
    progress: str | None = None  # "step steps samples", pushed to Redis by the keeper
    started_ms: int = 0
    dirty: bool = False


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class Worker:
    def __init__(self, engine, client: redis.Redis, url: str, *, prefix: str = "diffserve", name: str | None = None,
                 concurrency: int = 4, visibility_timeout: float = 30.0, max_attempts: int = 3,
                 heartbeat_interval: float | None = None):
        if concurrency < 1 or max_attempts < 1 or visibility_timeout <= 0:
            raise ValueError("concurrency and max_attempts must be at least 1, visibility_timeout positive")
        if concurrency > engine.config.max_queue:
            raise ValueError(f"worker concurrency {concurrency} is above the engine's max_queue "
                             f"{engine.config.max_queue}")
        self.engine, self.url = engine, url
        self.queue = TaskQueue(client, prefix)
        self.name = name or default_name()
        self.concurrency, self.max_attempts = concurrency, max_attempts
        self.visibility_ms = int(visibility_timeout * 1000)
        self.heartbeat_interval = heartbeat_interval or min(5.0, visibility_timeout / 4)
        self.pb, self.jobs_pb = protogen.module("diffserve_pb2"), protogen.module("jobs_pb2")
        self._held: dict[str, Held] = {}
        self._lock = threading.Condition()
        self._specs: dict[str, codec.JobSpec] = {}
        self._stopping = threading.Event()  # take no new tasks
        self._abort = threading.Event()     # give up on Redis, leave entries pending
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"task-{self.name}")
        self._threads: list[threading.Thread] = []
        qm.WORKER_SLOTS.labels(self.name).set(concurrency)

    # lifecycle
    def start(self) -> threading.Thread:
        """Run in a background thread (the worker inside `diffserve serve`)."""
        thread = threading.Thread(target=self.run, name=f"worker-{self.name}", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Take tasks until stop(); Redis outages are waited out with backoff."""
        log.info("worker %s consuming tasks from %s (%d at once)", self.name, redact(self.url), self.concurrency)
        try:
            self._redis(self.queue.ensure_groups, "creating the consumer groups")
            for target in (self._keeper, self._listener):
                thread = threading.Thread(target=target, name=f"{target.__name__[1:]}-{self.name}", daemon=True)
                thread.start()
                self._threads.append(thread)
            for entry in self._redis(lambda: self.queue.own_pending(self.name), "reading own pending tasks"):
                self._submit(entry)
            self._loop()
        except Stopped:
            pass

    def _loop(self) -> None:
        backoff, last_reclaim = Backoff(), 0.0
        while not self._stopping.is_set():
            with self._lock:
                free = self.concurrency - len(self._held)
                if free <= 0:
                    self._lock.wait(0.5)
                    continue
            try:
                entries = []
                if time.monotonic() - last_reclaim > min(5.0, self.visibility_ms / 2000):
                    last_reclaim = time.monotonic()
                    entries = self.queue.reclaim(self.name, self.visibility_ms, free)
                    if entries:
                        log.info("reclaimed %d stale task(s): %s", len(entries),
                                 ", ".join(f"{e.job_id}/{e.task}" for e in entries))
                if not entries and not self._stopping.is_set():
                    entries = self.queue.read(self.name, free, block_ms=1000)
                backoff.reset()
            except CONNECTION_ERRORS as err:
                delay = backoff.next_delay()
                log.warning("redis at %s unreachable (%s); retrying in %.1f s", redact(self.url),
                            type(err).__name__, delay)
                self._stopping.wait(delay)
                continue
            except redis.ResponseError as err:
                if "NOGROUP" in str(err):  # Redis came back without our data (no persistence): start over
                    self._redis(self.queue.ensure_groups, "creating the consumer groups")
                    continue
                raise
            for entry in entries:
                self._submit(entry)

    def stop(self, grace: float = 10.0) -> None:
        """Take no new tasks; let running ones finish for up to `grace` s, then hand the rest back to the queue."""
        self._stopping.set()
        end = time.monotonic() + grace
        with self._lock:
            while self._held and time.monotonic() < end:
                self._lock.wait(max(0.0, min(0.2, end - time.monotonic())))
            for held in self._held.values():
                held.reason = "shutdown"
                held.cancel.set()
            while self._held and time.monotonic() < end + 5:
                self._lock.wait(0.2)
        self._abort.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for thread in self._threads:
            thread.join(timeout=3)
        try:
            self.queue.leave(self.name)
        except (*CONNECTION_ERRORS, redis.ResponseError):
            pass
        qm.WORKER_BUSY.labels(self.name).set(0)
        log.info("worker %s stopped", self.name)

    def _redis(self, fn, what: str):
        return retry_forever(fn, self._abort, what, self.url)

    # tasks
    def _submit(self, entry: TaskEntry) -> None:
        with self._lock:
            if entry.entry_id in self._held:
                return
            self._held[entry.entry_id] = Held(entry)
            qm.WORKER_BUSY.labels(self.name).set(len(self._held))
        self._pool.submit(self._process, entry)

    def _release(self, entry: TaskEntry) -> None:
        with self._lock:
            self._held.pop(entry.entry_id, None)
            qm.WORKER_BUSY.labels(self.name).set(len(self._held))
            self._lock.notify_all()

    def _process(self, e: TaskEntry) -> None:
        try:
            self._attempt(e, self._held[e.entry_id])
        except Stopped:
            pass  # Redis is gone and we are stopping: the entry stays pending and will be reclaimed
        except Exception:  # noqa: BLE001 - a bug must not kill the pool thread; the entry will be reclaimed
            log.exception("task %s/%s: unexpected error; leaving it pending", e.job_id, e.task)
        finally:
            self._release(e)

    def _attempt(self, e: TaskEntry, held: Held) -> None:
        cached = self._specs.get(e.job_id)
        start = self._redis(lambda: self.queue.start(e, with_spec=cached is None), "starting a task")
        spec = None if start.action != "run" else cached or start.spec
        if start.spec is not None:  # a small cache: the tasks of a job come together
            if len(self._specs) >= 256:
                self._specs.pop(next(iter(self._specs)))
            self._specs[e.job_id] = start.spec
        if spec is None:  # cancelled, failed or expired job: nothing to compute
            self._redis(lambda: self.queue.ack(e), "dropping a task")
            qm.TASKS_DROPPED.inc()
            return
        if self._stopping.is_set():
            self._redis(lambda: self.queue.retry(e, "", counted=False), "handing a task back")
            return
        attempt = start.failed + e.deliveries  # failed attempts, deaths of earlier workers, and this one
        if attempt > self.max_attempts:  # its previous workers died (or it kept failing)
            self._dead_letter(e, spec, start.detail or DIED, attempt - 1)
            return
        request = spec.task_request(e.task)
        began = time.time()
        qm.DISPATCH_SECONDS.observe(max(0.0, began - e.enqueued))
        held.progress, held.started_ms, held.dirty = f"0 1 {request.n}", int(began * 1000), True

        def on_step(info):
            done, total = (info.step + 1, info.steps) if hasattr(info, "step") else (info.nfe, info.budget_nfe)
            held.progress, held.dirty = f"{done} {total} {request.n}", True  # a search reports NFE of its budget

        try:
            out = self.engine.generate(spec.model, request, on_step=on_step, cancel=held.cancel)
        except Cancelled:
            if held.reason == "shutdown":
                self._redis(lambda: self.queue.retry(e, "", counted=False), "handing a task back")
            else:
                self._redis(lambda: self.queue.ack(e), "dropping a task")
                qm.TASKS_DROPPED.inc()
            return
        except (NotReady, QueueFull):  # this worker's engine is stopping or full: another worker takes it
            self._redis(lambda: self.queue.retry(e, "", counted=False), "handing a task back")
            self._stopping.wait(1.0)  # not at once back to the same task (a model that failed its warm-up)
            return
        except Exception as err:  # noqa: BLE001 - every failure is recorded on the task
            self._failed(e, spec, err, attempt)
            return
        computed = time.time()
        payload = codec.task_result(self.pb, self.jobs_pb, out, spec.format, self.name, attempt, spec.png_scale)
        self._redis(lambda: self.queue.store(e, payload, request.n), "storing a result")
        qm.STORE_SECONDS.observe(time.time() - computed)
        qm.TASK_SECONDS.labels(spec.model).observe(out.compute_seconds)
        qm.TASKS_PROCESSED.labels(spec.model).inc()

    def _failed(self, e: TaskEntry, spec: codec.JobSpec, err: BaseException, attempts: int) -> None:
        _, message = status_of(err)  # the client-safe message; details of unexpected errors go to the log
        log.warning("task %s/%s attempt %d failed: %s", e.job_id, e.task, attempts, message,
                    exc_info=not isinstance(err, DiffservError))
        qm.TASKS_FAILED.labels(spec.model).inc()
        if isinstance(err, InvalidRequest) or attempts >= self.max_attempts:  # invalid input never gets better
            self._dead_letter(e, spec, message, attempts)
        else:
            self._redis(lambda: self.queue.retry(e, message), "queueing a task again")
            qm.TASKS_RETRIED.labels(spec.model).inc()

    def _dead_letter(self, e: TaskEntry, spec: codec.JobSpec, error: str, attempts: int) -> None:
        first, stop = spec.task_range(e.task)
        times = "once" if attempts == 1 else f"{attempts} times"
        message = (f"task {e.task + 1} of {spec.tasks} (samples {first}-{stop - 1}) failed {times}; "
                   f"last error: {error}")
        log.error("job %s failed: %s", e.job_id, message)
        self._redis(lambda: self.queue.dead_letter(e, error, attempts, self.name, message), "dead-lettering")
        qm.TASKS_DEAD.labels(spec.model).inc()

    # background threads
    def _keeper(self) -> None:
        """Progress every 0.25 s; heartbeat, pending-entry refresh and job-state check every heartbeat_interval;
        trimming of acknowledged entries every 30 s."""
        last_beat = last_trim = -1e9
        while True:
            try:
                with self._lock:
                    held = list(self._held.values())
                updates = {h.entry: (h.progress, h.started_ms) for h in held if h.dirty and h.progress}
                for h in held:
                    h.dirty = False
                if updates:
                    self.queue.progress(updates)
                now = time.monotonic()
                if now - last_beat >= self.heartbeat_interval:
                    last_beat = now
                    self._beat(held)
                if now - last_trim >= 30:
                    last_trim = now
                    self.queue.trim()
            except (*CONNECTION_ERRORS, redis.ResponseError) as err:
                log.debug("keeper: %s", err)
            if self._abort.wait(0.25):
                return

    def _beat(self, held: list[Held]) -> None:
        info = {"busy": len(held), "slots": self.concurrency, "host": socket.gethostname(), "pid": os.getpid(),
                "tasks": [f"{h.entry.job_id}/{h.entry.task}" for h in held[:32]], "time": time.time()}
        self.queue.heartbeat(self.name, info, ttl=3 * self.heartbeat_interval)
        if held:
            self.queue.touch(self.name, [h.entry for h in held])
            states = self.queue.states(sorted({h.entry.job_id for h in held}))
            self._cancel_jobs({j for j, s in states.items() if s in (None, "succeeded", "failed", "cancelled")})

    def _cancel_jobs(self, job_ids: set[str]) -> None:
        with self._lock:
            for h in self._held.values():
                if h.entry.job_id in job_ids and not h.cancel.is_set():
                    h.reason = "ended"
                    h.cancel.set()

    def _listener(self) -> None:
        """Job-ended events (pub/sub) stop running tasks within one sampler step; the keeper's state check
        catches any event missed while disconnected."""
        backoff = Backoff()
        while not self._abort.is_set():
            pubsub = self.queue.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.queue.keys.events)
                backoff.reset()
                while not self._abort.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and message["type"] == "message":
                        kind, _, job_id = message["data"].decode().partition(" ")
                        if kind == "end":
                            self._cancel_jobs({job_id})
            except (*CONNECTION_ERRORS, redis.ResponseError):
                self._abort.wait(backoff.next_delay())
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001, S110 - closing a dead connection
                    pass
