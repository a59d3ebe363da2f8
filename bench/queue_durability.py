"""What a crash of Redis loses from the job queue, per AOF fsync policy (appendfsync always / everysec).

Clients submit one-task jobs as fast as they can (JobStore.submit: the same script SubmitJob runs); after a
while redis-server is SIGKILLed, then restarted on its data directory.  A job is *accepted* when submit
returned its id; the table counts accepted jobs that are gone after the restart, and jobs that were stored
although their client saw an error (at-least-once from the client's side: it retries, and an idempotency key
makes that retry return the stored job).  The submit latency and rate say what `always` costs.

A SIGKILL of the process cannot show everysec's window: Redis write(2)s the AOF before it replies, so the
kernel holds every acknowledged write.  What everysec can lose is what the kernel had not yet flushed when
the machine itself stops (power loss, kernel panic, VM killed): up to about one second of acknowledged writes
(two when fsync falls behind), i.e. up to `submits_per_s` jobs at the rates measured here.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from server.errors import QueueUnavailable
from server.generation import GenerateRequest
from server.queue.codec import JobSpec
from server.queue.local import LocalRedis
from server.queue.store import JobStore

SPEC = JobSpec("bench-unet", GenerateRequest("dpmpp_2m", 10, n=64, seed=0), 2, 64)


def trial(policy: str, seconds: float, clients: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-durability-") as tmp:
        server = LocalRedis(Path(tmp) / "redis", appendfsync=policy).start()
        try:
            store = JobStore(server.url, "durability")
            store.submit(SPEC, 3600)  # creates the consumer groups
            accepted: list[str] = []
            latencies: list[float] = []
            lock = threading.Lock()

            def client():
                while True:
                    start = time.perf_counter()
                    try:
                        job_id, _ = store.submit(SPEC, 3600)
                    except QueueUnavailable:
                        return  # Redis is gone: this submit was not accepted
                    with lock:
                        accepted.append(job_id)
                        latencies.append(time.perf_counter() - start)

            threads = [threading.Thread(target=client) for _ in range(clients)]
            began = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(seconds)
            server.kill()  # SIGKILL in the middle of the submits
            elapsed = time.perf_counter() - began
            for t in threads:
                t.join(30)
            server.start()  # same port, same data directory
            store = JobStore(server.url, "durability")
            pipe = store.redis.pipeline(transaction=False)
            for job_id in accepted:
                pipe.exists(store.keys.job(job_id))
            present = sum(pipe.execute())
            stored = store.redis.zcard(store.keys.jobs("all")) - 1  # minus the first job
            tasks = store.redis.xlen(store.keys.stream("normal")) - 1
        finally:
            server.stop()
    return {"accepted": len(accepted), "lost": len(accepted) - present,
            "stored_unacknowledged": stored - present, "tasks_lost": stored - tasks,
            "submit_ms_p50": 1000 * statistics.median(latencies), "submits_per_s": len(accepted) / elapsed}


def main(quick: bool = False) -> dict:
    trials, seconds, clients = (1, 1.0, 4) if quick else (3, 3.0, 4)
    rows = []
    for policy in ("always", "everysec"):
        runs = [trial(policy, seconds, clients) for _ in range(trials)]
        rows.append({"policy": policy, "trials": trials,
                     **{k: sum(r[k] for r in runs) for k in ("accepted", "lost", "stored_unacknowledged",
                                                              "tasks_lost")},
                     "submit_ms_p50": round(statistics.median(r["submit_ms_p50"] for r in runs), 3),
                     "submits_per_s": round(statistics.median(r["submits_per_s"] for r in runs), 1)})
    print(f"SIGKILL of redis-server during {clients} submitting clients, {seconds:.0f} s each, {trials} trial(s)")
    print(f"{'appendfsync':12s} {'accepted':>9s} {'lost':>5s} {'stored w/o ack':>15s} {'submit p50 ms':>14s} "
          f"{'submits/s':>10s} {'power-loss window':>18s}")
    for r in rows:
        window = "0 jobs" if r["policy"] == "always" else f"<= ~{r['submits_per_s']:.0f} jobs (1 s)"
        print(f"{r['policy']:12s} {r['accepted']:9d} {r['lost']:5d} {r['stored_unacknowledged']:15d} "
              f"{r['submit_ms_p50']:14.3f} {r['submits_per_s']:10.1f} {window:>18s}")
    return {"rows": rows}
