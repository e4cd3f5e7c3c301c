"""Live counts of a run, reported by the workers: what the progress line shows and the error budget judges.

One small actor per run holds a handful of counters (never rows or ids). Workers add to it after each
commit; the driver reads it to draw the progress line. The error budget is judged here, where every
worker's failures meet, and the answer goes back to the workers with each report so they stop taking rows.
"""

from __future__ import annotations

from collections import Counter

from factory.errors import FactoryError
from factory.jobs.spec import ErrorBudget

RESULT_STATUSES = ("ok", "blocked", "rejected", "failed")


class JobStopped(FactoryError):
    """A worker's view: the run's tally says stop (the error budget ran out); committed rows stay committed."""


class JobAborted(FactoryError):
    """The driver's view: the error budget ran out; what was committed stays committed."""


class RunTally:
    def __init__(self, budget: ErrorBudget | None = None):
        self.budget = budget
        self.counts: Counter[str] = Counter()
        self.stopped_reason: str | None = None

    def add(self, counts: dict[str, int]) -> str | None:
        """Add counts (result statuses, "rejects", "rows_read", "chunks"); the reason the run must stop, or None."""
        self.counts.update(counts)
        if self.stopped_reason is None and self.budget is not None:
            failed = self.counts["failed"]
            finished = sum(self.counts[status] for status in RESULT_STATUSES)
            if self.budget.exceeded(failed, finished):
                self.stopped_reason = f"{failed} of {finished} rows failed, over the error budget"
        return self.stopped_reason

    def snapshot(self) -> tuple[dict[str, int], str | None]:
        return dict(self.counts), self.stopped_reason


def start_tally(budget: ErrorBudget | None):
    """The run's tally actor, on the driver's node: it only adds numbers (no CPU), and it must outlive any other
    node the run loses (the driver's is one the run cannot lose)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(RunTally).options(num_cpus=0, scheduling_strategy=here).remote(budget)


def tally_counts(tally) -> dict[str, int]:
    import ray

    counts, _ = ray.get(tally.snapshot.remote())
    return counts


def budget_stop(tally, job: str, run_id: str, root: str) -> JobAborted | None:
    """The error to stop with when the run's tally says the error budget ran out, else None."""
    import ray

    _, stopped = ray.get(tally.snapshot.remote())
    if not stopped:
        return None
    return JobAborted(f"job {job}: {stopped}; stopped, committed rows are kept under {root} "
                      f"(re-run with --run-id {run_id} to resume)")
