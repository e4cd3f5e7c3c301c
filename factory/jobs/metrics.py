"""Ray metrics for a running job: Ray's Prometheus endpoint shows rows by status and tenant, and task time."""

from __future__ import annotations

from ray.util import metrics

from factory.routing.requests import TaskResult

# Seconds; diffusion rows on a GPU take seconds, tiny rows on a CPU milliseconds.
LATENCY_BOUNDARIES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]


class JobMetrics:
    def __init__(self, job: str):
        self.job = job
        self.rows = metrics.Counter(
            "factory_rows", description="Rows finished, by status, tenant and task",
            tag_keys=("job", "status", "tenant", "task"),
        )
        self.seconds = metrics.Histogram(
            "factory_row_seconds", description="Wall time per row from request to committed image",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("job", "task"),
        )

    def record(self, result: TaskResult, seconds: float) -> None:
        tags = {"job": self.job, "status": result.status.value, "tenant": result.tenant, "task": result.task.value}
        self.rows.inc(1, tags=tags)
        self.seconds.observe(seconds, tags={"job": self.job, "task": result.task.value})
