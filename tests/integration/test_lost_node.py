"""A worker node lost in the middle of a job, on a Ray cluster of three nodes on this machine (a head without CPUs
and two workers, token auth on): Serve starts the replica the node held on the other worker, the chunks that were
in flight are redone from what they committed, every row ends `ok` exactly once, and the driver's console says
in one line that a node was lost, without the tracebacks Ray and Serve log while they recover."""

from __future__ import annotations

import threading
import time

import pytest

from tests.drivers import start_driver
from tests.integration.test_console import PROGRESS
from tests.integration.test_engine import assert_exactly_once, results, write_rows, write_spec
from tests.raynodes import LocalCluster

pytestmark = pytest.mark.slow

LOST = "warning: Ray node "


def test_a_worker_node_lost_mid_job_leaves_every_row_ok_once_and_a_quiet_console(factory_home, tiny_path, tmp_path):
    ids = write_rows(tmp_path / "rows.jsonl", 48)
    spec = write_spec(tmp_path, "lostnode", "rows.jsonl", str(tmp_path / "out"),
                      "serve: {num_cpus: 1, max_batch_size: 2}\nchunk_rows: 8\n"
                      "retry: {attempts: 12, backoff_s: 0.5, max_backoff_s: 8}\n")
    root = str(tmp_path / "out" / "lostnode")
    cluster = LocalCluster(workers=2, head_cpus=0, worker_cpus=1)
    try:
        driver = start_driver("run", spec, cluster.address)
        console: list[str] = []
        reader = threading.Thread(target=lambda: console.extend(driver.stderr.read().decode().splitlines()))
        reader.start()
        deadline = time.monotonic() + 400
        while len(results(root)) < 8:
            assert time.monotonic() < deadline and driver.poll() is None, "the job never got going"
            time.sleep(0.2)
        (node,) = cluster.actor_nodes("ServeReplica:factory-lostnode:StackReplica")
        assert node in cluster.workers  # the head has no CPU: the replica runs on a worker
        cluster.remove_worker(node)
        driver.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        cluster.close()

    assert driver.returncode == 0, "\n".join(console[-60:])
    assert_exactly_once(root, ids)
    said = [line for line in console if line.startswith(LOST)]
    assert len(said) == 1 and node[:8] in said[0], console
    noise = [line for line in console if not PROGRESS.match(line) and not line.startswith(LOST)]
    assert not noise, "\n".join(noise)
