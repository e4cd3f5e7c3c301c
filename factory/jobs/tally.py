"""Live counts of a run, reported by the workers: what the progress line shows and the error budget judges.

One small actor per run holds a handful of counters (never rows or ids). Workers add to it after each
commit; the driver reads it to draw the progress line. The error budget is judged here, where every
worker's failures meet, and the answer goes back to the workers with each report so they stop taking rows.
"""

from __future__ import annotations

from collections import Counter

from factory.jobs.spec import ErrorBudget

RESULT_STATUSES = ("ok", "blocked", "rejected", "failed")


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

