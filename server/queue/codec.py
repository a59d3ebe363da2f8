"""What travels through Redis: a job's spec (JSON, written once per job) and a task's result (a proto).

A job of n samples is split into tasks of at most K samples; task t covers samples [tK, min(n, (t+1)K)) with
their own seeds, so a task computes exactly the samples direct generation would give those seeds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from ..convert import sample_protos
from ..requests import GenerateRequest, SearchRequest


@dataclass(frozen=True)
class JobSpec:
    model: str
    request: GenerateRequest     # the whole job: request.n samples, defaults filled in
    format: int                  # OutputFormat value
    task_size: int
    png_scale: int = 1           # PNG output: the request's png_scale (1: native resolution)

    @property
    def tasks(self) -> int:
        return -(-self.request.n // self.task_size)

    def task_range(self, task: int) -> tuple[int, int]:
        start = task * self.task_size
        return start, min(self.request.n, start + self.task_size)

    def task_request(self, task: int) -> GenerateRequest:
        """The request of one task: the job's request for that task's samples and seeds."""
        start, stop = self.task_range(task)
        r = self.request
        seeds = r.seeds[start:stop] if r.seeds is not None else tuple(range(r.seed + start, r.seed + stop))
        return replace(r, n=stop - start, seed=0, seeds=tuple(seeds))

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "format": self.format, "task_size": self.task_size,
                           "png_scale": self.png_scale, "request": asdict(self.request)}, sort_keys=True,
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        raw = json.loads(text)
        req = raw["request"]
        for key in ("seeds", "prompt_tokens"):
            if req.get(key) is not None:
                req[key] = tuple(req[key])
        if req.get("search") is not None:  # asdict flattened it; the worker needs the dataclass back
            req["search"] = SearchRequest(**req["search"])
        return cls(raw["model"], GenerateRequest(**req), raw["format"], raw["task_size"], raw.get("png_scale", 1))

    def request_hash(self) -> str:
        """Identifies the work (not the task size), to refuse an idempotency key reused for other work."""
        work = {"model": self.model, "format": self.format, "request": asdict(self.request)}
        if self.png_scale != 1:  # only then: hashes of jobs stored before png_scale existed stay the same
            work["png_scale"] = self.png_scale
        body = json.dumps(work, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


def samples(pb, result, fmt: int, png_scale: int = 1) -> list:
    """A GenerateResult's samples as Sample protos, exactly as Generate returns them."""
    return sample_protos(pb, result, fmt, png_scale)


def task_result(pb, jobs_pb, out, fmt: int, worker: str, attempt: int, png_scale: int = 1) -> bytes:
    """The bytes a worker stores for a task (an EngineResult in, a serialized TaskResult out)."""
    message = jobs_pb.TaskResult(samples=samples(pb, out.result, fmt, png_scale), nfe=out.result.nfe,
                                 compute_seconds=out.compute_seconds, worker=worker, attempt=attempt)
    return message.SerializeToString()
