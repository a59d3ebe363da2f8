"""The job queue as the server sees it: submit, read, cancel, page through results, list.

Every Redis failure leaves here as QueueUnavailable (UNAVAILABLE to the client); redis-py reconnects by
itself on the next call, so the RPCs work again as soon as Redis is back.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import redis

from samplers.errors import InvalidRequest

from ..errors import IdempotencyConflict, JobNotFinished, JobNotFound
from . import scripts
from .codec import JobSpec
from .connection import CONNECTION_ERRORS, connect, unavailable
from .keys import GROUP, PRIORITIES, STATES, Keys, idempotency_hash


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(mapping: dict) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in mapping.items()}


def register_scripts(client: redis.Redis) -> dict:
    names = ("SUBMIT", "START", "STORE", "RETRY", "DEAD_LETTER", "CANCEL", "PROGRESS", "PRUNE", "TRIM")
    return {name.lower(): client.register_script(getattr(scripts, name)) for name in names}


def ensure_groups(client: redis.Redis, keys: Keys) -> None:
    """The consumer group on every task stream, reading from the start (so tasks added before it count)."""
    for stream in keys.streams:
        try:
            client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise


class JobStore:
    def __init__(self, url: str, prefix: str = "diffserve", client: redis.Redis | None = None):
        self.url = url
        self.keys = Keys(prefix)
        self.redis = client if client is not None else connect(url, fail_fast=True, name="diffserve-server")
        self.scripts = register_scripts(self.redis)
        self._groups = False

    @contextmanager
    def available(self):
        try:
            yield
        except CONNECTION_ERRORS as err:
            raise unavailable(self.url, err) from None
        except redis.ResponseError as err:
            if "LOADING" in str(err) or "MASTERDOWN" in str(err):
                raise unavailable(self.url, err) from None
            raise

    def _run(self, name: str, *args, keys=()):
        return self.scripts[name](keys=list(keys), args=[self.keys.prefix, *args])

    def ping(self) -> None:
        with self.available():
            self.redis.ping()

    # writes
    def submit(self, spec: JobSpec, ttl_seconds: float, priority: str = "normal",
               idempotency_key: str | None = None) -> tuple[str, bool]:
        """Queue the job and all its tasks in one script; (job id, created).  A known idempotency key returns its
        job (created False), unless that job was for other work."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority {priority!r}")
        job_id = uuid.uuid4().hex
        idem = idempotency_hash(idempotency_key) if idempotency_key else ""
        request_hash = spec.request_hash()
        with self.available():
            if not self._groups:
                ensure_groups(self.redis, self.keys)
                self._groups = True
            got = _text(self._run("submit", job_id, idem, int(ttl_seconds * 1000), spec.request.n, spec.task_size,
                                  spec.tasks, spec.to_json(), request_hash, spec.model, spec.request.sampler,
                                  priority, spec.format, self.keys.stream(priority), idempotency_key or ""))
            if got == job_id:
                return job_id, True
            if _text(self.redis.hget(self.keys.job(got), "request_hash") or b"") != request_hash:
                raise IdempotencyConflict(f"idempotency_key: already used by job {got} for a different request")
            return got, False

    def cancel(self, job_id: str) -> dict[str, str]:
        with self.available():
            if not self._run("cancel", job_id):
                raise JobNotFound(f"job {job_id}: not found (never submitted, or expired with its results)")
        return self.record(job_id)

    # reads
    def record(self, job_id: str) -> dict[str, str]:
        """The job's hash, plus "progress:{task}" -> "step steps samples" of its running tasks."""
        with self.available():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.keys.job(job_id))
            pipe.hgetall(self.keys.job(job_id, "progress"))
            job, progress = pipe.execute()
        if not job:
            raise JobNotFound(f"job {job_id}: not found (never submitted, or expired with its results)")
        out = _decode(job)
        out.pop("spec", None)
        out.update({f"progress:{k}": v for k, v in _decode(progress).items()})
        return out

    def results(self, job_id: str, offset: int, limit: int, max_bytes: int) -> tuple[dict, list, int | None, int]:
        """(record, TaskResult bytes covering samples [offset, offset + limit), next offset or None, nfe):
        the caller slices the samples; pages stop early rather than exceed max_bytes."""
        record = self.record(job_id)
        if record["state"] != "succeeded":
            why = f": {record['error']}" if record.get("error") else ""
            raise JobNotFinished(f"job {job_id} is {record['state']}{why}; results exist once it has succeeded")
        n, size = int(record["n"]), int(record["task_size"])
        if not 0 <= offset < n:
            raise InvalidRequest("page_token: not a token from a previous page")
        stop = min(n, offset + limit)
        tasks = list(range(offset // size, (stop - 1) // size + 1))
        with self.available():
            payloads = self.redis.hmget(self.keys.job(job_id, "results"), tasks)
        if any(p is None for p in payloads):  # expired between the two reads
            raise JobNotFound(f"job {job_id}: its results expired")
        taken, total = [], 0
        for p in payloads:
            if taken and total + len(p) > max_bytes:
                break
            taken.append(p)
            total += len(p)
        covered = min(stop, (tasks[0] + len(taken)) * size)
        return record, taken, (covered if covered < n else None), covered - offset

    def list(self, state: str, before_seq: float | None, limit: int) -> tuple[list[dict], float | None]:
        """Jobs newest first (by submission), optionally of one state; (records, cursor of the next page)."""
        with self.available():
            self._run("prune", "")
            top = f"({before_seq:.0f}" if before_seq is not None else "+inf"
            rows = self.redis.zrevrangebyscore(self.keys.jobs(state), top, "-inf", start=0, num=limit,
                                               withscores=True)
            pipe = self.redis.pipeline(transaction=False)
            for job_id, _ in rows:
                pipe.hgetall(self.keys.job(_text(job_id)))
            jobs = pipe.execute() if rows else []
        records = []
        for job in jobs:
            if job:
                record = _decode(job)
                record.pop("spec", None)
                records.append(record)
        cursor = rows[-1][1] if len(rows) == limit else None
        return records, cursor

    def stats(self) -> dict:
        """Figures for metrics and autoscaling: jobs by state, per stream length / lag / pending, dead letters."""
        with self.available():
            self._run("prune", "")
            pipe = self.redis.pipeline(transaction=False)
            for state in STATES:
                pipe.zcard(self.keys.jobs(state))
            pipe.xlen(self.keys.dead)
            pipe.zcount(self.keys.workers, int(time.time() * 1000), "+inf")  # scores: heartbeat expiry
            counts = pipe.execute()
            streams = {}
            for priority, stream in zip(PRIORITIES, self.keys.streams):
                streams[priority] = {"length": self.redis.xlen(stream), "lag": 0, "pending": 0}
                try:
                    groups = self.redis.xinfo_groups(stream)
                except redis.ResponseError:  # no stream yet
                    continue
                for g in groups:
                    if _text(g["name"]) == GROUP:
                        lag = g.get("lag")
                        streams[priority].update(pending=int(g["pending"]),
                                                 lag=int(lag) if lag is not None else streams[priority]["length"])
        return {"jobs": dict(zip(STATES, counts[:len(STATES)])), "dead_letters": counts[len(STATES)],
                "workers": counts[len(STATES) + 1], "streams": streams}
