"""One progress line for people, drawn from the counts workers report to the run's tally.

A background thread reads the tally every half second on a terminal (every few seconds into a log file) and
rewrites one line: the phase, rows done of the phase's total, rows per second, and counts by status. A phase's
total is known when it starts (the input rows to validate, the rows that run), or grows as the tally counts it
(the objects of archives, listed as the run goes).
"""

from __future__ import annotations

import sys
import threading
import time

STATUSES = ("ok", "blocked", "rejected", "failed")


class Progress:
    def __init__(self, tally, enabled: bool = True, stream=None):
        self.tally = tally
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = 0.5 if self.stream.isatty() else 5.0
        self.label = ""
        self.total = self.start_total = 0
        self.keys: tuple[str, ...] = ()
        self.grows = False
        self.base: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()
        self.last_line = ""
        self._stop = threading.Event()
        self._writing = threading.Lock()  # the drawing thread and notes (a lost node) share the stream
        self._thread: threading.Thread | None = None

    def phase(self, label: str, total: int, *keys: str, grows: bool = False) -> None:
        """Start a phase: `total` rows (and, if it `grows`, those the tally counts as `planned` from now on), done
        when the tally's `keys` add up to it."""
        self._draw(final=True)
        self.base = self._snapshot()
        self.label, self.start_total, self.total, self.keys, self.grows = label, total, total, keys, grows
        self.started = time.monotonic()
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="factory-progress", daemon=True)
            self._thread.start()

    def line(self) -> str:
        counts = {key: value - self.base.get(key, 0) for key, value in self.counts.items()}
        if self.grows:
            self.total = self.start_total + counts.get("planned", 0)
        done = sum(counts.get(key, 0) for key in self.keys)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        by_status = "  ".join(f"{status} {counts[status]}" for status in STATUSES if counts.get(status))
        return f"{self.label} {done}/{self.total}  {done / elapsed:.1f} rows/s  {by_status}".rstrip()

    def note(self, text: str) -> None:
        """A line a person should read, once, above the progress line (on a terminal, over it)."""
        with self._writing:
            self.stream.write(("\r" if self.stream.isatty() else "") + text.ljust(72) + "\n")
            self.stream.flush()
            self.last_line = ""

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._draw(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._draw()

    def _snapshot(self) -> dict[str, int]:
        try:
            import ray

            counts, _ = ray.get(self.tally.snapshot.remote(), timeout=10)
            return counts
        except Exception:  # noqa: BLE001 - a progress line never stops a run
            return dict(self.counts)

    def _draw(self, final: bool = False) -> None:
        if not self.enabled or not self.label:
            return
        self.counts = self._snapshot()
        line = self.line()
        tty = self.stream.isatty()
        if not tty and line.split("  ")[0] == self.last_line.split("  ")[0]:
            return  # a log file gets a line when the count moved, not every few seconds of a quiet phase
        with self._writing:
            self.last_line = line
            self.stream.write(line.ljust(72) + ("\r" if tty and not final else "\n"))
            self.stream.flush()
