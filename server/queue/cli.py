"""Command-line subcommands of the job queue: worker, submit, job, jobs, cancel, results."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..client import DEFAULT_SERVER, add_connection_flags, add_request_flags, connect_jobs, positive_int

STATE_NAMES = ("queued", "running", "succeeded", "failed", "cancelled")


def cmd_worker(args) -> int:
    from ..app import apply_torch_threads, load_models, load_resources
    from ..config import load_server_config
    from ..engine import Engine
    from ..metrics import serve_metrics
    from .connection import connect
    from .worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    url = args.redis or os.environ.get("DIFFSERVE_REDIS_URL")
    config = load_server_config(args.config, redis_url=url, queue_worker_concurrency=args.concurrency)
    if not config.redis_url:
        raise ValueError("--redis: give the queue's Redis URL (or set DIFFSERVE_REDIS_URL, or redis_url in the "
                             "config's [server] table)")
    client = connect(config.redis_url, fail_fast=False, name="diffserve-worker")
    apply_torch_threads(config)
    engine = Engine(load_models(args.config, config.device), config, load_resources(args.config, config.device))
    engine.warm_up()
    if args.metrics_port is not None:
        serve_metrics(args.metrics_port, config.host)
    c = config
    worker = Worker(engine, client, c.redis_url, prefix=c.queue_prefix, name=args.name,
                    concurrency=c.queue_worker_concurrency, visibility_timeout=c.queue_visibility_timeout,
                    max_attempts=c.queue_max_attempts)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = worker.start()
    while not stop.wait(0.5) and thread.is_alive():
        pass
    worker.stop(c.grace_seconds)
    engine.close()
    return 0


def _stub(args):
    return connect_jobs(args.server, args.token, args.ca)


def cmd_submit(args) -> int:
    from .. import protogen
    from ..client import generate_request, takes_prompt

    pb = protogen.module("diffserve_pb2")
    jpb, stub, metadata = _stub(args)
    formats = {"png": pb.PNG, "npy": pb.TENSOR, "text": pb.TEXT}
    request = generate_request(pb, args, formats[args.format], takes_prompt(args))
    priority = jpb.JobPriority.Value(f"JOB_PRIORITY_{args.priority.upper()}")
    job = stub.SubmitJob(jpb.SubmitJobRequest(request=request, idempotency_key=args.idempotency_key or "",
                                              priority=priority), metadata=metadata)
    print(job.id)
    return 0


def _state(jpb, job) -> str:
    return jpb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()


def _describe(jpb, job) -> str:
    line = (f"{job.id}  {_state(jpb, job):9s}  {job.model}/{job.sampler}  {job.samples_done}/{job.num_samples} "
            f"samples  {job.tasks_done}/{job.tasks_total} tasks  {100 * job.progress:.0f}%")
    if job.retries:
        line += f"  {job.retries} retries"
    return line + (f"\n  {job.error}" if job.error else "")


def cmd_job(args) -> int:
    import grpc
    from tqdm import tqdm

    from .connection import Backoff

    jpb, stub, metadata = _stub(args)
    job = stub.GetJob(jpb.GetJobRequest(id=args.id), metadata=metadata)
    if args.watch and job.state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING):
        backoff = Backoff(cap=10.0)
        call = None
        # Ctrl-C ends the process at once: a KeyboardInterrupt raised inside gRPC's streaming iterator can leave
        # its lock held, and the call's destructor then waits on it forever.
        previous = signal.signal(signal.SIGINT, _exit_on_interrupt)
        try:
            with tqdm(total=job.num_samples, desc=job.id[:8], unit="sample", disable=args.quiet) as bar:
                while job.state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING):
                    call = stub.WatchJob(jpb.GetJobRequest(id=args.id), metadata=metadata)
                    try:
                        for job in call:
                            bar.set_postfix_str(_state(jpb, job))
                            bar.update(round(job.progress * job.num_samples) - bar.n)
                            backoff.reset()
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.UNAVAILABLE:
                            raise
                        delay = backoff.next_delay()
                        bar.write(f"queue unavailable ({err.details()}); retrying in {delay:.1f} s")
                        time.sleep(delay)
        finally:
            signal.signal(signal.SIGINT, previous)
    print(_describe(jpb, job))
    return 0 if job.state in (jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING) else 1


def _exit_on_interrupt(signum, frame) -> None:
    """SIGINT while watching a job: a newline after the progress bar, then exit 130 (the job keeps running)."""
    sys.stderr.write("\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(130)


def cmd_jobs(args) -> int:
    jpb, stub, metadata = _stub(args)
    state = jpb.JobState.Value(f"JOB_STATE_{args.state.upper()}") if args.state else jpb.JOB_STATE_UNSPECIFIED
    reply = stub.ListJobs(jpb.ListJobsRequest(state=state, page_size=args.limit), metadata=metadata)
    for job in reply.jobs:
        print(_describe(jpb, job))
    return 0


def cmd_cancel(args) -> int:
    jpb, stub, metadata = _stub(args)
    print(_describe(jpb, stub.CancelJob(jpb.CancelJobRequest(id=args.id), metadata=metadata)))
    return 0


def cmd_results(args) -> int:
    """Write every sample of a succeeded job into --out: NNNNNN.png / .npy / .txt, and seeds.csv."""
    import numpy as np

    from ..client import tensor_to_array

    jpb, stub, metadata = _stub(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    token, written = "", 0
    with open(out / "seeds.csv", "w") as seeds:
        seeds.write("index,seed\n")
        while True:
            page = stub.GetJobResults(jpb.GetJobResultsRequest(id=args.id, page_size=args.page_size, page_token=token),
                                      metadata=metadata)
            for k, sample in enumerate(page.samples, start=page.offset):
                kind = sample.WhichOneof("data")
                if kind == "png":
                    (out / f"{k:06d}.png").write_bytes(sample.png)
                elif kind == "tensor":
                    np.save(out / f"{k:06d}.npy", tensor_to_array(sample.tensor))
                else:
                    (out / f"{k:06d}.txt").write_text(sample.text + "\n")
                seeds.write(f"{k},{sample.seed}\n")
                written += 1
            token = page.next_page_token
            if not token:
                break
    print(f"wrote {written} samples of job {args.id} to {out}")
    return 0


def add_queue_commands(sub) -> None:
    """Register the queue's subcommands on the `diffserve` parser."""
    default_config = str(Path(__file__).resolve().parents[2] / "zoo" / "models.toml")

    wrk = sub.add_parser("worker", help="run a queue worker: take tasks from Redis, compute them, store results")
    wrk.add_argument("--redis", help="Redis URL, e.g. redis://:PASSWORD@HOST:6379/0 or rediss://... (default: "
                                     "$DIFFSERVE_REDIS_URL, or redis_url in the config)")
    wrk.add_argument("--config", default=default_config, help="models config (TOML); default: the zoo's")
    wrk.add_argument("--name", help="consumer name (default: HOST-PID-RANDOM); a stable name resumes its own tasks")
    wrk.add_argument("--concurrency", type=positive_int, help="tasks at once (default: queue_worker_concurrency, 4)")
    wrk.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus /metrics on this port")
    wrk.set_defaults(func=cmd_worker)

    sbm = sub.add_parser("submit", help="queue a batch job on a server; prints the job id")
    add_request_flags(sbm)
    sbm.add_argument("--format", choices=("png", "npy", "text"), default="png",
                     help="how results are stored: png (images), npy (raw tensors) or text (text models); "
                          "default png")
    sbm.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    sbm.add_argument("--priority", choices=("high", "normal", "low"), default="normal",
                     help="workers take high before normal before low (default normal)")
    sbm.set_defaults(func=cmd_submit)
    add_connection_flags(sbm, DEFAULT_SERVER)

    job = sub.add_parser("job", help="show a job; --watch follows it with a progress bar until it ends")
    job.add_argument("id", help="the job id `submit` printed")
    job.add_argument("--watch", action="store_true", help="follow the job until it ends (Ctrl-C stops watching)")
    job.add_argument("--quiet", action="store_true", help="no progress bar")
    job.set_defaults(func=cmd_job)
    add_connection_flags(job, DEFAULT_SERVER)

    jobs = sub.add_parser("jobs", help="list recent jobs, newest first")
    jobs.add_argument("--state", choices=STATE_NAMES, help="only jobs in this state")
    jobs.add_argument("--limit", type=positive_int, default=20, help="at most this many jobs (default 20)")
    jobs.set_defaults(func=cmd_jobs)
    add_connection_flags(jobs, DEFAULT_SERVER)

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("id", help="the job id")
    cancel.set_defaults(func=cmd_cancel)
    add_connection_flags(cancel, DEFAULT_SERVER)

    res = sub.add_parser("results", help="write a succeeded job's samples into a directory")
    res.add_argument("id", help="the job id")
    res.add_argument("--out", required=True, help="directory for NNNNNN.png / .npy / .txt and seeds.csv")
    res.add_argument("--page-size", type=positive_int, default=256, help="samples per request (default 256)")
    res.set_defaults(func=cmd_results)
    add_connection_flags(res, DEFAULT_SERVER)
