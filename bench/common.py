"""What the benchmarks share: whether each timed run did the work it is timed for, joining or starting Ray, and
the whole-process-tree memory sampler.

A run of the engine can skip the model for some of its rows: images reused from an earlier run (`_reuse/`),
chunks committed by an earlier attempt (resume), copies of an image claimed by another row (archive
duplicates). A timed run that skips the model measures copying, not the work its figure names. So every bench
that times the engine gives each timed run an output of its own, reads from the run's summary how many of its
rows reached the replicas, prints those counts beside its figure (a `WORK` line per run), and prints no ratio
when any timed run sent fewer (or more) rows to the model than it was given.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any


def tree_rss() -> int:
    """Resident bytes of this process and every process under it (the driver and the Ray processes it started)."""
    import psutil

    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakTreeRss:
    """Samples `tree_rss` every `every_s` seconds in a thread while the `with` block runs; `.peak` is the largest."""

    def __init__(self, every_s: float = 0.2):
        self.every_s = every_s
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakTreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())


# ---- the work each timed run did ------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What one timed run did: of `input_rows`, how many got the work its figure names (`done_as`: a model
    call, or validation where no model runs), and how many skipped it and why."""

    label: str
    input_rows: int
    rows_done: int
    done_as: str = "model"
    committed: int | None = None  # rows the run's summary holds (earlier attempts' included)
    reused: int = 0  # images copied from an earlier run's `_reuse/` record
    read_again: int = 0  # rows of chunks an earlier attempt had started (a resumed run)
    summary: str | None = None  # the run's summary.json

    def problem(self) -> str | None:
        """Why this run's figure does not measure its work over its input rows, or None."""
        if self.rows_done == self.input_rows and not self.read_again:
            return None
        why = [f"{self.reused} reused from an earlier run"] if self.reused else []
        if self.read_again:
            why.append(f"{self.read_again} read again by a resumed run")
        skipped = (self.committed or 0) - self.rows_done - self.reused
        if skipped > 0:
            why.append(f"{skipped} committed without a model call (resume, duplicate copies)")
        if self.rows_done > self.input_rows:
            why.append(f"more {self.done_as} rows than input rows: some rows ran twice")
        return (f"{self.label}: {self.rows_done} {self.done_as} rows of {self.input_rows} input rows"
                + (f" ({'; '.join(why)})" if why else ""))

    def line(self) -> str:
        """The machine-readable record of the run (the smoke test reads it): `WORK <label>: k=v ...`."""
        fields = {"input_rows": self.input_rows, f"{self.done_as}_rows": self.rows_done, "committed": self.committed,
                  "reused": self.reused, "rows_read_again": self.read_again, "summary": self.summary}
        return f"WORK {self.label}: " + " ".join(f"{key}={value}" for key, value in fields.items()
                                                 if value is not None)

    def brief(self) -> str:
        """Short form, printed beside the run's figure."""
        return (f"{self.rows_done}/{self.input_rows} rows {self.done_as}" + (f", {self.reused} reused" if self.reused else ""))


def run_work(label: str, input_rows: int, summary: Any) -> Work:
    """A factory run's work, from its RunSummary (what `summary.json` holds)."""
    from factory.io.layout import OutputLayout

    return Work(label=label, input_rows=input_rows, rows_done=summary.model_rows, committed=summary.rows,
                reused=summary.reused, read_again=summary.rows_read_again,
                summary=OutputLayout(summary.output).summary)


class WorkLog:
    """Every timed run's work; `check` stands between the figures and their ratios (and throughputs)."""

    def __init__(self) -> None:
        self.runs: list[Work] = []

    def add(self, work: Work) -> Work:
        self.runs.append(work)
        print(f"  {work.line()}", flush=True)
        return work

    def check(self) -> None:
        """Return when every timed run did its work on exactly its input rows, none of them read again;
        otherwise print why, one line per run, and exit non-zero (code 2) instead of printing a ratio built on
        copied work."""
        problems = [problem for problem in (work.problem() for work in self.runs) if problem]
        if not self.runs:
            problems = ["no timed run was recorded"]
        if problems:
            for problem in problems:
                print(f"NO RATIO: {problem}", flush=True)
            print("NO RATIO: a timed run that skips its work measures copying, not the work it names; give "
                  "every timed run its own output (or turn reuse, resume and duplicate claims off)", flush=True)
            sys.exit(2)


# ---- Ray --------------------------------------------------------------------------------------------------


def join_or_start_ray(address: str | None, num_cpus: int) -> None:
    """Join the cluster at `address` as a factory driver would; or start a private Ray for this bench with
    `num_cpus` logical CPUs (more than the cores, so the designs compared never wait for a slot: the warm
    replica keeps its CPUs while an actor pool's actor takes its own, and Ray Data's light stages find slots too).
    """
    import ray

    from factory.jobs.cluster import connect

    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    connect(address)


def add_ray_arguments(parser: Any, *, cpus: float, cpus_help: str) -> None:
    """`--address` and `--cpus`, the same in every bench that runs on Ray."""
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (host:port) instead of starting a private one; the figures "
                             "then share its cores with whatever else runs there")
    parser.add_argument("--cpus", type=float, default=cpus, help=f"{cpus_help} (default {cpus:g})")
