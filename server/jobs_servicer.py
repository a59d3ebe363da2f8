"""The Jobs gRPC service: translation between job protos and the queue's JobStore, a few lines per RPC."""

from __future__ import annotations

import math
import time

from models.config import ConfigError
from samplers.errors import InvalidRequest

from . import convert, protogen
from . import queue_metrics as qm
from .errors import QueueUnavailable
from .queue.codec import JobSpec
from .queue.keys import IDEMPOTENCY_KEY, JOB_ID, PRIORITIES, STATES, TERMINAL
from .queue.store import JobStore
from .servicer import output_format

WATCH_POLL_SECONDS = 0.2
DEFAULT_PAGE, MAX_PAGE = 256, 4096
DEFAULT_LIST, MAX_LIST = 50, 1000


def job_id(text: str) -> str:
    if not JOB_ID.fullmatch(text or ""):
        raise InvalidRequest(f"id: {text[:40]!r} is not a job id (32 lowercase hex digits)")
    return text


def make_jobs_servicer(engine, store: JobStore | None, config, why_unavailable: str = ""):
    if not 1 <= config.queue_task_size <= config.max_samples:
        raise ConfigError(f"server.queue_task_size: {config.queue_task_size} is outside [1, max_samples = "
                          f"{config.max_samples}] (workers run each task as one request)")
    pb, jpb, jgrpc = (protogen.module(m) for m in ("diffserve_pb2", "jobs_pb2", "jobs_pb2_grpc"))
    states = {name: jpb.JobState.Value(f"JOB_STATE_{name.upper()}") for name in STATES}
    priorities = {jpb.JobPriority.Value(f"JOB_PRIORITY_{name.upper()}"): name for name in PRIORITIES}

    def queue() -> JobStore:
        if store is None:
            raise QueueUnavailable(why_unavailable or "this server runs without a job queue")
        return store

    def to_job(r: dict):
        n, done = int(r["n"]), int(r["samples_done"])
        running = 0.0
        for key, value in r.items():
            if key.startswith("progress:"):
                step, steps, samples = (int(v) for v in value.split())
                running += step / max(steps, 1) * samples
        progress = 1.0 if r["state"] == "succeeded" else min(1.0, (done + running) / n)
        seconds = {k: int(r[k]) / 1000 for k in ("created", "started", "finished", "expires")}
        return jpb.Job(id=r["id"], state=states[r["state"]], model=r["model"], sampler=r["sampler"], num_samples=n,
                       samples_done=done, tasks_total=int(r["tasks_total"]), tasks_done=int(r["tasks_done"]),
                       progress=progress, error=r.get("error", ""), retries=int(r["retries"]),
                       priority=jpb.JobPriority.Value(f"JOB_PRIORITY_{r['priority'].upper()}"), format=int(r["format"]),
                       created_unix=seconds["created"], started_unix=seconds["started"],
                       finished_unix=seconds["finished"], expires_unix=seconds["expires"],
                       idempotency_key=r.get("idem_key", ""), task_size=int(r["task_size"]))

    class JobsServicer(jgrpc.JobsServicer):
        def SubmitJob(self, request, context):
            jobs = queue()
            entry, _ = engine.model_info(request.request.model)
            if request.request.preview_every:
                raise InvalidRequest("preview_every: jobs report progress through GetJob / WatchJob, not previews")
            key = request.idempotency_key
            if key and not IDEMPOTENCY_KEY.fullmatch(key):
                raise InvalidRequest("idempotency_key: 1-128 characters of letters, digits and . _ : -")
            if request.priority not in priorities:
                raise InvalidRequest(f"priority: unknown value {request.priority}")
            req = convert.to_request(pb, request.request, entry)
            engine.plan(entry.name, req, output=output_format(pb, request.request.format),
                        png_scale=request.request.png_scale, job=True)
            spec = JobSpec(entry.name, req, request.request.format, config.queue_task_size,
                           max(1, request.request.png_scale))
            jid, created = jobs.submit(spec, config.queue_result_ttl, priorities[request.priority], key or None)
            if created:
                qm.JOBS_SUBMITTED.labels(entry.name).inc()
            return to_job(jobs.record(jid))

        def GetJob(self, request, context):
            return to_job(queue().record(job_id(request.id)))

        def WatchJob(self, request, context):
            jobs, jid, last = queue(), job_id(request.id), None
            while context.is_active():
                job = to_job(jobs.record(jid))
                if job != last:
                    yield job
                    last = job
                if job.state in (states[s] for s in TERMINAL):
                    return
                time.sleep(WATCH_POLL_SECONDS)

        def CancelJob(self, request, context):
            return to_job(queue().cancel(job_id(request.id)))

        def GetJobResults(self, request, context):
            jobs, jid = queue(), job_id(request.id)
            token = request.page_token
            if token and not token.isdigit():
                raise InvalidRequest("page_token: not a token from a previous page")
            offset = int(token or 0)
            size = request.page_size or DEFAULT_PAGE
            if size > MAX_PAGE:
                raise InvalidRequest(f"page_size: at most {MAX_PAGE}")
            record, payloads, next_offset, count = jobs.results(jid, offset, size, config.max_message_bytes // 2)
            samples, nfe = [], 0
            for payload in payloads:
                result = jpb.TaskResult.FromString(payload)
                samples.extend(result.samples)
                nfe = result.nfe
            skip = offset - offset // int(record["task_size"]) * int(record["task_size"])
            return jpb.GetJobResultsResponse(id=jid, samples=samples[skip: skip + count], offset=offset,
                                             total_samples=int(record["n"]), nfe=nfe,
                                             next_page_token="" if next_offset is None else str(next_offset))

        def ListJobs(self, request, context):
            state = "all" if request.state == jpb.JOB_STATE_UNSPECIFIED else next(
                (name for name, value in states.items() if value == request.state), None)
            if state is None:
                raise InvalidRequest(f"state: unknown value {request.state}")
            limit = request.page_size or DEFAULT_LIST
            if limit > MAX_LIST:
                raise InvalidRequest(f"page_size: at most {MAX_LIST}")
            try:
                before = float(request.page_token) if request.page_token else None
            except ValueError:
                raise InvalidRequest("page_token: not a token from a previous page") from None
            if before is not None and not math.isfinite(before):
                raise InvalidRequest("page_token: not a token from a previous page")
            records, cursor = queue().list(state, before, limit)
            return jpb.ListJobsResponse(jobs=[to_job(r) for r in records],
                                        next_page_token="" if cursor is None else f"{cursor:.0f}")

    return JobsServicer()


def jobs_service(store: JobStore | None, config, why_unavailable: str = ""):
    """The `services` hook of start_server: registers Jobs on the gRPC server (UNAVAILABLE without a store)."""
    def add(server, engine) -> list[str]:
        jgrpc = protogen.module("jobs_pb2_grpc")
        jgrpc.add_JobsServicer_to_server(make_jobs_servicer(engine, store, config, why_unavailable), server)
        if store is not None:
            qm.watch(store)
        return [protogen.module("jobs_pb2").DESCRIPTOR.services_by_name["Jobs"].full_name]
    return add
