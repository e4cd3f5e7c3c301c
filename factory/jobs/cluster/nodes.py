"""Nodes lost while a run goes on: said once on the console, the details in the log file.

When a worker node dies, Ray and Serve recover by themselves: Serve starts the replicas it held on other nodes,
Ray Data retries its tasks and restarts its actors elsewhere, and the chunks that were in flight are redone from
what they committed. A person needs one line of that: which node was lost, and that its work moved. Serve's
controller and proxies report the same recovery at ERROR, with tracebacks, from their own processes;
`factory.logs` keeps those expected lines off the console (they stay in the log file).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


def alive_nodes() -> dict[str, str]:
    """Node id -> address, of the cluster's live nodes."""
    import ray

    return {node["NodeID"]: node.get("NodeManagerAddress", "") for node in ray.nodes() if node.get("Alive")}


class NodeWatch:
    """While the `with` block runs, checks every `every_s` seconds which of the nodes alive at its start have died,
    and says so once per node through `say`."""

    def __init__(self, say: Callable[[str], None], every_s: float = 2.0):
        self.say = say
        self.every_s = every_s
        self.known: dict[str, str] = {}
        self.lost: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="factory-nodes", daemon=True)

    def __enter__(self) -> NodeWatch:
        self.known = alive_nodes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.check(alive_nodes())
            except Exception as error:  # noqa: BLE001 - watching never stops a run
                log.info("could not list the cluster's nodes", error=repr(error))

    def check(self, alive: dict[str, str]) -> list[str]:
        """Say which known nodes are no longer in `alive` (each once); their ids."""
        gone = [node for node in self.known if node not in alive and node not in self.lost]
        for node in gone:
            self.lost.add(node)
            address = self.known[node]
            log.info("a Ray node was lost during the run", node=node, address=address)
            self.say(f"warning: Ray node {address} ({node[:8]}) was lost; its replicas and tasks moved to other nodes, "
                     "and the chunks it held are redone from what they committed")
        return gone
