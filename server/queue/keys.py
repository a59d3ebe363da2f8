"""Redis key names of the job queue (one prefix per deployment).

    {p}:tasks:{high|normal|low}   streams of tasks, consumed by the consumer group "workers"
    {p}:dead                      dead-letter stream: tasks that failed their last attempt
    {p}:job:{id}                  hash: state, counts, times, the job's spec (JSON), error
    {p}:job:{id}:results          hash: task index -> TaskResult (written once: HSETNX)
    {p}:job:{id}:progress         hash: task index -> "step steps samples" of running tasks
    {p}:job:{id}:attempts         hash: task index -> starts so far; "error:{task}" -> last error
    {p}:jobs:{state} / :all       sorted sets of job ids by submission sequence (ListJobs, metrics)
    {p}:expiries                  sorted set: finished job id -> expiry time (pruning the sets above)
    {p}:idem:{sha256(key)}        idempotency key -> job id
    {p}:worker:{name}             a worker's heartbeat (expires when the worker stops beating)
    {p}:workers                   sorted set: worker name -> when its heartbeat expires
    {p}:events                    pub/sub: "end {id}" when a job ends (workers cancel its running tasks)

Every job key gets the result TTL when the job ends.  Scripts build job key names from the prefix, so the
queue needs a standalone Redis (or one Redis Cluster slot), not a sharded cluster.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

GROUP = "workers"
PRIORITIES = ("high", "normal", "low")  # read in this order
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_ID = re.compile(r"[0-9a-f]{32}")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(frozen=True)
class Keys:
    prefix: str = "diffserve"

    def stream(self, priority: str) -> str:
        return f"{self.prefix}:tasks:{priority}"

    @property
    def streams(self) -> list[str]:
        return [self.stream(p) for p in PRIORITIES]

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def job(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{job_id}" + (f":{part}" if part else "")

    def jobs(self, state: str = "all") -> str:
        return f"{self.prefix}:jobs:{state}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{idempotency_hash(key)}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
