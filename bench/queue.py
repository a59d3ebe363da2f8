"""The job queue against direct generation: samples per second for one job through `diffserve worker`
processes (1 and 2) and the same work through Generate on a server process, plus the queue's own overhead
per task (enqueue to start of compute, and result write to acknowledgement).

Every process runs one torch thread, so "direct" and "queue, 1 worker" spend equal compute.  The server and
workers are the real commands (`diffserve serve --redis URL`, `diffserve worker`), started from a forkserver
that has imported torch once, over a real redis-server with AOF (appendfsync always).  The model is a small
UNet written with diffusers' save_pretrained (random weights: throughput does not depend on them).  Figures
are medians over rounds of (direct, queued) back to back, with the per-round ratios, because this is meant
to run on shared machines.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG = """model_roots = ["."]

[server]
max_batch = 64
queue_task_size = {task_size}
queue_worker_concurrency = {concurrency}
grace_seconds = 2.0

[[models]]
name = "bench-unet"
directory = "unet"
kind = "diffusion"
default_sampler = "dpmpp_2m"
default_steps = {steps}
null_class = 10
"""


def _write_model(root: Path) -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11)
    unet.save_pretrained(root / "unet" / "unet", safe_serialization=True)
    DDPMScheduler().save_pretrained(root / "unet" / "scheduler")


def _cli(argv: list[str], log: str, go) -> None:
    """A child process: the `diffserve` command line with one torch thread, output to a log file; it starts
    once `go` is set (so a second worker can be forked early and join the queue later)."""
    import sys

    import torch

    torch.set_num_threads(1)
    out = open(log, "a")  # noqa: SIM115 - the child's stdout/stderr for its whole life
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    go.wait()
    from server.cli import main

    sys.exit(main(argv))


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


class Bench:
    def __init__(self, root: Path, quick: bool):
        from server.queue.local import LocalRedis, free_port

        self.root, self.quick = root, quick
        self.n, self.task_size, self.steps, self.concurrency = (500, 50, 4, 4) if quick else (2000, 64, 4, 4)
        (root / "models.toml").write_text(CONFIG.format(task_size=self.task_size, concurrency=self.concurrency,
                                                         steps=self.steps))
        self.redis = LocalRedis(root / "redis", appendfsync="always").start()
        # torch is imported once, by the forkserver; the model is written and every process forked from there
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "diffusers", "server.cli", "server.app", "server.queue.worker"])
        writer = self.ctx.Process(target=_write_model, args=(root,))
        writer.start()
        writer.join()
        self.port, self.procs, self.worker_ports, self.events = free_port(), [], [], []

    def spawn(self, argv: list[str], name: str, go=None):
        if go is None:
            go = self.ctx.Event()
            go.set()
        self.events.append(go)  # alive until the child has unpickled it
        proc = self.ctx.Process(target=_cli, args=(argv, str(self.root / f"{name}.log"), go), daemon=True)
        proc.start()
        self.procs.append(proc)
        return go

    def fork_worker(self, k: int):
        """A worker process, forked now, joining the queue when the returned event is set."""
        from server.queue.local import free_port

        port = free_port()
        self.worker_ports.append(port)
        return self.spawn(["worker", "--config", str(self.root / "models.toml"), "--redis", self.redis.url, "--name",
                           f"bench-{k}", "--metrics-port", str(port)], f"worker{k}", self.ctx.Event())

    def wait_worker(self, k: int) -> None:
        self._wait(lambda: self._alive(self.worker_ports[k - 1]), f"worker {k}")

    def start_server(self):
        import grpc

        from server import protogen

        self.spawn(["serve", "--config", str(self.root / "models.toml"), "--port", str(self.port), "--metrics-port",
                    "0", "--redis", self.redis.url], "server")
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(channel).result(timeout=300)
        self.pb = protogen.module("diffserve_pb2")
        self.jpb = protogen.module("jobs_pb2")
        self.stub = protogen.module("diffserve_pb2_grpc").DiffserveStub(channel)
        self.jobs = protogen.module("jobs_pb2_grpc").JobsStub(channel)
        self._wait(lambda: self.stub.GetModel(self.pb.GetModelRequest(name="bench-unet")).ready, "the server")

    @staticmethod
    def _alive(port: int) -> bool:
        try:
            return _metric(port, "diffserve_queue_worker_slots") > 0
        except OSError:
            return False

    @staticmethod
    def _wait(predicate, what: str, timeout: float = 300.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if predicate():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{what} did not come up")

    def request(self, n: int, seed: int):
        return self.pb.GenerateRequest(model="bench-unet", steps=self.steps, num_samples=n, base_seed=seed,
                                       class_label=3, guidance=1.0, format=self.pb.TENSOR)

    def direct(self, n: int) -> float:
        chunks = [(start, min(n, start + self.task_size)) for start in range(0, n, self.task_size)]
        begin = time.perf_counter()
        with ThreadPoolExecutor(self.concurrency) as pool:
            done = sum(len(r.samples) for r in pool.map(
                lambda c: self.stub.Generate(self.request(c[1] - c[0], c[0])), chunks))
        assert done == n
        return n / (time.perf_counter() - begin)

    def queued(self, n: int) -> float:
        """Samples per second from submission to the last result stored (Redis' own timestamps, so the
        polling here, kept slow to leave the CPU to the worker, does not count)."""
        job = self.jobs.SubmitJob(self.jpb.SubmitJobRequest(request=self.request(n, 0)))
        while job.state not in (self.jpb.JOB_STATE_SUCCEEDED, self.jpb.JOB_STATE_FAILED):
            time.sleep(0.05)
            job = self.jobs.GetJob(self.jpb.GetJobRequest(id=job.id))
        assert job.state == self.jpb.JOB_STATE_SUCCEEDED and job.samples_done == n, job.error
        return n / (job.finished_unix - job.created_unix)

    def overhead_ms(self, tasks: int) -> tuple[float, float]:
        """Median dispatch (enqueue -> compute starts) and store (compute ends -> ack) in ms, read from the
        worker's own histograms after each of `tasks` single-task jobs run one at a time (so no task waits for a
        busy worker; the median, because on a shared machine a few tasks wait for a CPU)."""
        port = self.worker_ports[0]
        names = ("diffserve_queue_task_dispatch_seconds_sum", "diffserve_queue_task_store_seconds_sum")
        per_task = []
        for _ in range(tasks):
            before = [_metric(port, m) for m in names]
            self.queued(self.task_size)
            per_task.append([1000 * (_metric(port, m) - b) for m, b in zip(names, before)])
        return tuple(statistics.median(column) for column in zip(*per_task))

    def fsync_policy(self, policy: str) -> None:
        import redis

        redis.Redis.from_url(self.redis.url).config_set("appendfsync", policy)

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        self.redis.stop()


def _paired(bench, run, rounds: int) -> tuple[list[float], list[float]]:
    """`rounds` of (direct, run) back to back: pairs see the same background load, so their ratio is steadier
    than either figure on a shared machine."""
    direct, other = [], []
    for _ in range(rounds):
        direct.append(bench.direct(bench.n))
        other.append(run(bench.n))
    return direct, other


def main(quick: bool = False) -> dict:
    rounds = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        bench = Bench(Path(tmp), quick)
        try:
            bench.fork_worker(1).set()
            second = bench.fork_worker(2)
            bench.start_server()
            bench.wait_worker(1)
            bench.direct(bench.task_size)  # warm both paths
            bench.queued(bench.task_size)
            direct_1, queue_1 = _paired(bench, bench.queued, rounds)
            tasks = 8 if quick else 30
            dispatch, store = bench.overhead_ms(tasks)
            bench.fsync_policy("everysec")
            lazy = sum(bench.overhead_ms(tasks))
            bench.fsync_policy("always")
            second.set()
            bench.wait_worker(2)
            bench.queued(bench.task_size)
            direct_2, queue_2 = _paired(bench, bench.queued, rounds)
        finally:
            bench.close()
    med = statistics.median
    ratios = {1: [q / d for d, q in zip(direct_1, queue_1)], 2: [q / d for d, q in zip(direct_2, queue_2)]}

    def row(mode, workers, per_round, paired):  # each round's figure and its ratio to that round's direct run
        return {"mode": mode, "workers": workers, "samples_per_s": round(med(per_round), 1),
                "samples_per_s_each_round": [round(x, 1) for x in per_round],
                "paired_ratios": [round(x, 3) for x in paired], "paired_ratio_median": round(med(paired), 3)}

    rows = [row("direct", 1, direct_1 + direct_2, [1.0] * len(direct_1 + direct_2)),
            row("queue", 1, queue_1, ratios[1]), row("queue", 2, queue_2, ratios[2])]
    overhead = round(dispatch + store, 2)
    print(f"job of {bench.n} samples, tasks of {bench.task_size}, {bench.steps} steps, one torch thread per process; "
          f"medians of {rounds} rounds, each direct then queued")
    print(f"{'mode':8s} {'workers':>7s} {'samples/s':>10s} {'paired ratio to direct (median, each round)':>45s}")
    for r in rows:
        each = ratios.get(r["workers"]) if r["mode"] == "queue" else [1.0]
        print(f"{r['mode']:8s} {r['workers']:7d} {r['samples_per_s']:10.1f}   {med(each):5.2f}  "
              + " ".join(f"{x:.2f}" for x in each))
    print(f"queue overhead per task (median): {overhead:.2f} ms (enqueue -> start {dispatch:.2f} ms, "
          f"result write -> ack {store:.2f} ms) with appendfsync always; {lazy:.2f} ms with everysec")
    return {"rows": rows, "rounds": rounds, "overhead_ms_per_task": overhead,
            "overhead_ms": {"enqueue_to_start": round(dispatch, 2), "result_write_to_ack": round(store, 2),
                            "appendfsync_everysec_total": round(lazy, 2)}}
