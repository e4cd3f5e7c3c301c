"""What the benchmarks share: the whole-process-tree memory sampler and medians."""

from __future__ import annotations

import threading
import time


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
