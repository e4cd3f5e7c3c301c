"""One progress line for people: rows done / total, rows/s, and counts by status."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True, every_s: float = 0.5, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = every_s if self.stream.isatty() else 5.0  # a log file gets a line every few seconds
        self.started = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.counts: dict[str, int] = {}

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        by_status = " ".join(f"{status} {count}" for status, count in sorted(self.counts.items()))
        return f"rows {self.done}/{self.total}  {self.done / elapsed:.1f} rows/s  {by_status}"

    def update(self, counts: dict[str, int]) -> None:
        self.counts = dict(counts)
        self.done = sum(counts.values())
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._write()

    def _write(self) -> None:
        end = "\r" if self.stream.isatty() else "\n"
        self.stream.write(self.line().ljust(72) + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(self.line().ljust(72) + "\n")
            self.stream.flush()
