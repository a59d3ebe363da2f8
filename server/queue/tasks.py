"""The job queue as a worker sees it: read tasks from the streams, reclaim stale ones, record each outcome.

Reads go through the consumer group, so each entry is delivered to one worker and sits in the group's
pending list until acknowledged.  A worker acknowledges only inside the script that stores the result (or
queues the task again, or dead-letters it), so an entry is never acknowledged without its outcome recorded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

import redis

from .codec import JobSpec
from .keys import GROUP, Keys
from .store import _decode, _text, ensure_groups, register_scripts

log = logging.getLogger("diffserve.queue")


@dataclass(frozen=True)
class TaskEntry:
    stream: str
    entry_id: str
    job_id: str
    task: int
    enqueued: float      # unix seconds on Redis' clock
    deliveries: int = 1  # times the group delivered this entry (more than 1: reclaimed from a dead worker)


@dataclass(frozen=True)
class Start:
    action: str      # "run", "skip" (job finished or cancelled) or "gone" (job expired)
    failed: int      # attempts that failed with an error and were queued again (deaths not included)
    detail: str      # run: the previous attempt's error; skip: the job's state
    spec: JobSpec | None = None  # when asked for


class TaskQueue:
    def __init__(self, client: redis.Redis, prefix: str = "diffserve"):
        self.redis = client
        self.keys = Keys(prefix)
        self.scripts = register_scripts(client)

    def _run(self, name: str, *args, keys=()):
        return self.scripts[name](keys=list(keys), args=[self.keys.prefix, *args])

    def ensure_groups(self) -> None:
        ensure_groups(self.redis, self.keys)

    def _entries(self, reply, bad: list) -> list[TaskEntry]:
        out = []
        for stream, rows in reply or []:
            for entry_id, fields in rows:
                if not fields:
                    continue  # trimmed or deleted while pending: nothing to run
                fields = _decode(fields)
                try:
                    us = fields["enqueued"]
                    out.append(TaskEntry(_text(stream), _text(entry_id), fields["job"], int(fields["task"]),
                                         int(us) / 1e6))
                except (KeyError, ValueError):
                    bad.append((_text(stream), _text(entry_id)))
        return out

    def _parse(self, reply) -> list[TaskEntry]:
        bad: list = []
        entries = self._entries(reply, bad)
        for stream, entry_id in bad:  # not ours to run: acknowledge so it leaves the pending list
            log.error("dropping malformed entry %s on %s", entry_id, stream)
            self.redis.xack(stream, GROUP, entry_id)
        return entries

    def read(self, consumer: str, count: int, block_ms: int) -> list[TaskEntry]:
        """New entries: high before normal before low; if none is waiting, block on all streams."""
        for stream in self.keys.streams:
            got = self._parse(self.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=count))
            if got:
                return got
        reply = self.redis.xreadgroup(GROUP, consumer, {s: ">" for s in self.keys.streams}, count=1, block=block_ms)
        return self._parse(reply)

    def own_pending(self, consumer: str, count: int = 1000) -> list[TaskEntry]:
        """Entries delivered to this consumer name and never acknowledged (a restart under the same name)."""
        reply = self.redis.xreadgroup(GROUP, consumer, {s: "0" for s in self.keys.streams}, count=count)
        return self._with_deliveries(self._parse(reply))

    def _with_deliveries(self, entries: list[TaskEntry]) -> list[TaskEntry]:
        """The group's delivery count of each entry (XPENDING; a read)."""
        out = []
        for e in entries:
            info = self.redis.xpending_range(e.stream, GROUP, e.entry_id, e.entry_id, 1)
            out.append(replace(e, deliveries=int(info[0]["times_delivered"])) if info else e)
        return out

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[TaskEntry]:
        """XAUTOCLAIM: take over entries idle for min_idle_ms (their worker stopped heartbeating)."""
        claimed: list[TaskEntry] = []
        for stream in self.keys.streams:
            cursor = "0-0"
            for _ in range(10):  # each call scans at most 10 x count pending entries
                reply = self.redis.xautoclaim(stream, GROUP, consumer, min_idle_ms, cursor, count=count - len(claimed))
                cursor = _text(reply[0])
                claimed += self._parse([(stream, reply[1])])
                if cursor == "0-0" or len(claimed) >= count:
                    break
            if len(claimed) >= count:
                break
        return self._with_deliveries(claimed)

    def touch(self, consumer: str, entries: list[TaskEntry]) -> None:
        """Heartbeat of running entries: reset their idle time (JUSTID: without counting a delivery)."""
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.entry_id)
        for stream, ids in by_stream.items():
            self.redis.xclaim(stream, GROUP, consumer, 0, ids, justid=True)

    # outcomes (one script each)
    def start(self, e: TaskEntry, with_spec: bool) -> Start:
        action, failed, detail, spec = self._run("start", e.job_id, e.task, "1" if with_spec else "0")
        return Start(_text(action), int(failed), _text(detail), JobSpec.from_json(spec) if spec else None)

    def store(self, e: TaskEntry, payload: bytes, samples: int) -> bool:
        return bool(self._run("store", e.job_id, e.task, payload, samples, e.stream, GROUP, e.entry_id))

    def retry(self, e: TaskEntry, error: str, counted: bool = True) -> None:
        """Queue the task again: a failed attempt (counted), or handed back by a stopping worker; deliveries
        of this entry before the current one were workers that died, and count as failed attempts."""
        self._run("retry", e.job_id, e.task, error, e.stream, GROUP, e.entry_id, "1" if counted else "0",
                  e.deliveries - 1)

    def dead_letter(self, e: TaskEntry, error: str, attempts: int, worker: str, message: str) -> None:
        self._run("dead_letter", e.job_id, e.task, error, e.stream, GROUP, e.entry_id, attempts, worker, message)

    def ack(self, e: TaskEntry) -> None:
        self.redis.xack(e.stream, GROUP, e.entry_id)

    def progress(self, updates: dict[TaskEntry, tuple[str, int]]) -> None:
        """Per task: ("step steps samples", unix ms it started); the first one marks a queued job running."""
        pipe = self.redis.pipeline(transaction=False)
        for e, (value, started_ms) in updates.items():
            self.scripts["progress"](keys=[], args=[self.keys.prefix, e.job_id, e.task, value, started_ms],
                                     client=pipe)
        pipe.execute()

    # jobs and workers
    def states(self, job_ids: list[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "state")
        return {j: (None if s is None else _text(s)) for j, s in zip(job_ids, pipe.execute())}

    def heartbeat(self, name: str, info: dict, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(name), json.dumps(info), px=int(ttl * 1000))
        pipe.zadd(self.keys.workers, {name: int((time.time() + ttl) * 1000)})
        pipe.zremrangebyscore(self.keys.workers, "-inf", int((time.time() - 3600) * 1000))
        pipe.execute()

    def leave(self, name: str) -> None:
        """A stopping worker: remove its heartbeat, and its consumer if it holds no pending entry."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.worker(name))
        pipe.zrem(self.keys.workers, name)
        pipe.execute()
        for stream in self.keys.streams:
            pending = self.redis.xpending_range(stream, GROUP, "-", "+", 1, consumername=name)
            if not pending:
                self.redis.xgroup_delconsumer(stream, GROUP, name)

    def trim(self) -> int:
        """Remove acknowledged entries from the streams (and forget expired jobs in the job sets)."""
        self._run("prune", "")
        return int(self._run("trim", "", GROUP, keys=self.keys.streams))
