"""Serve apps defined from several threads of one process at once (two jobs run from one driver, or a job beside
`factory serve`): Serve's request-router pickling goes through cloudpickle's process-wide pickle-by-value registry,
so unguarded concurrent definitions fail with ValueError now and then; factory's builders take one lock."""

from __future__ import annotations

import threading
from pathlib import Path

from factory.routing.app import build_serving_app, load_serving
from factory.routing.replica import ReplicaConfig, build_replica_app

THREADS, ROUNDS = 8, 30


def define_at_once(define) -> list[str]:
    failures: list[str] = []
    start = threading.Barrier(THREADS)

    def worker() -> None:
        start.wait()
        for _ in range(ROUNDS):
            try:
                define()
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(error)[:200])

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def test_replica_apps_defined_from_many_threads_at_once():
    config = ReplicaConfig()
    assert define_at_once(lambda: build_replica_app(config, replicas=2, max_queued_requests=8)) == []


def test_serving_apps_and_replica_apps_defined_side_by_side():
    tenants = Path(__file__).resolve().parents[2] / "jobs" / "tenants.yaml"
    serving = load_serving({"tenants": str(tenants)})
    config = ReplicaConfig()
    calls = iter(range(THREADS * ROUNDS))

    def define() -> None:  # half the definitions are whole serving apps (ingress + replicas), half replica apps
        build_serving_app(serving) if next(calls) % 2 else build_replica_app(config)

    assert define_at_once(define) == []
