"""Prometheus metrics of the job queue (prefix diffserve_queue_, bounded labels: model, state, priority, worker).

Workers count what they do (tasks processed / failed / retried / dead-lettered, durations, busy slots).
The server reads the shared figures from Redis at scrape time (jobs by state, stream length, consumer-group
lag and pending entries): `diffserve_queue_lag` is the number KEDA's lag trigger scales workers on.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .metrics import LATENCY_BUCKETS

log = logging.getLogger("diffserve.queue")
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

JOBS_SUBMITTED = Counter("diffserve_queue_jobs_submitted_total", "Jobs accepted by SubmitJob", ["model"])
TASKS_PROCESSED = Counter("diffserve_queue_tasks_processed_total", "Tasks whose result a worker stored", ["model"])
TASKS_FAILED = Counter("diffserve_queue_tasks_failed_total", "Task attempts that raised an error", ["model"])
TASKS_RETRIED = Counter("diffserve_queue_tasks_retried_total", "Failed task attempts queued again", ["model"])
TASKS_DEAD = Counter("diffserve_queue_tasks_dead_lettered_total",
                     "Tasks moved to the dead-letter stream after their last attempt", ["model"])
TASKS_DROPPED = Counter("diffserve_queue_tasks_dropped_total",
                        "Tasks skipped or stopped because their job was cancelled, failed or expired", [])
TASK_SECONDS = Histogram("diffserve_queue_task_seconds", "Compute time of a task", ["model"],
                         buckets=LATENCY_BUCKETS)
DISPATCH_SECONDS = Histogram("diffserve_queue_task_dispatch_seconds",
                             "From enqueue to the start of compute (waiting for a worker included)",
                             buckets=OVERHEAD_BUCKETS)
STORE_SECONDS = Histogram("diffserve_queue_task_store_seconds",
                          "From the end of compute to the acknowledgement (encode, store result, ack)",
                          buckets=OVERHEAD_BUCKETS)
WORKER_BUSY = Gauge("diffserve_queue_worker_busy_tasks", "Tasks this worker holds now (running or about to)",
                    ["worker"])
WORKER_SLOTS = Gauge("diffserve_queue_worker_slots", "Tasks this worker runs at once", ["worker"])


class QueueCollector:
    """Shared queue figures read from Redis on every scrape (one short pipeline; redis_up 0 when it fails)."""

    def __init__(self):
        self.store = None

    def collect(self):
        up = GaugeMetricFamily("diffserve_queue_redis_up", "1 when the job queue's Redis answered this scrape")
        if self.store is None:
            return
        try:
            stats = self.store.stats()
        except Exception as err:  # noqa: BLE001 - a scrape must not fail because Redis is down
            log.debug("queue stats unavailable: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("diffserve_queue_jobs", "Jobs stored in Redis by state", labels=["state"])
        for state, count in stats["jobs"].items():
            jobs.add_metric([state], count)
        yield jobs
        families = {
            "length": GaugeMetricFamily("diffserve_queue_stream_length", "Entries in a task stream (XLEN)",
                                        labels=["priority"]),
            "lag": GaugeMetricFamily("diffserve_queue_lag", "Tasks not yet delivered to any worker "
                                     "(consumer-group lag; the autoscaling signal)", labels=["priority"]),
            "pending": GaugeMetricFamily("diffserve_queue_pending", "Tasks delivered and not yet acknowledged "
                                         "(running, or on a dead worker until reclaimed)", labels=["priority"]),
        }
        for priority, figures in stats["streams"].items():
            for key, family in families.items():
                family.add_metric([priority], figures[key])
        yield from families.values()
        yield GaugeMetricFamily("diffserve_queue_dead_letters", "Entries in the dead-letter stream",
                                value=stats["dead_letters"])
        yield GaugeMetricFamily("diffserve_queue_workers", "Workers with a live heartbeat", value=stats["workers"])


COLLECTOR = QueueCollector()
REGISTRY.register(COLLECTOR)


def watch(store) -> None:
    """Export the shared queue figures of `store` (a JobStore) from this process."""
    COLLECTOR.store = store
