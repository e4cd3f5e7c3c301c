"""Local Ray heads that tests start with `ray start`, on loopback and free ports, each in a temp dir of its own, and
stop by killing their own processes only (never `ray stop`, which stops every Ray of the machine)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def agent_port_flags() -> list[str]:
    """Ray's fixed default ports (dashboard agent 52365, metrics, runtime-env agent) collide with any other Ray on
    the machine, and a dashboard agent that cannot bind leaves the Jobs API without an agent: pick free ones."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@dataclass(frozen=True)
class LocalHead:
    gcs: str          # host:port
    dashboard: str    # http://host:port
    temp_dir: str
    output: str       # what `ray start` printed


def start_head(flags: Sequence[str], env: Mapping[str, str], num_cpus: int = 1) -> LocalHead:
    """`ray start --head FLAGS` on loopback with free ports and a temp dir of its own (short: Ray's socket paths
    live under it), in exactly the environment `env`. Raises CalledProcessError when `ray start` refuses."""
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-auth-", dir="/tmp")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", *flags, "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", *agent_port_flags()],
        env=dict(env), capture_output=True, text=True, timeout=180,
    )
    if done.returncode != 0:
        stop_cluster(temp_dir)
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return LocalHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", temp_dir,
                     done.stdout + done.stderr)


def stop_cluster(temp_dir: str) -> None:
    """Stop the processes of the cluster started with `temp_dir` (and their workers), not every Ray on the
    machine as `ray stop` would."""
    import psutil

    started = [p for p in psutil.process_iter(["cmdline"])
               if p.pid != os.getpid() and any(temp_dir in part for part in p.info["cmdline"] or ())]
    processes = {p.pid: p for p in started}
    for process in started:
        try:
            processes.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.Error:
            pass
    for process in processes.values():
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(processes.values()), timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


# A Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster), run in a process of its own so that
# its Ray state (and Cluster's clean-up, which resets the caller's Ray client) never touches the test's. Each node
# has a loopback address of its own: a driver started on this machine attaches to the head (127.0.0.1), and the
# test can tell the nodes apart. The nodes inherit the environment, token auth included.
_CLUSTER = """
import json, os, sys
from ray.cluster_utils import Cluster

spec = json.loads(sys.argv[1])
# Cluster records its head in Ray's "current cluster" file, which a later ray.init() with no address would join:
# put back what was there.
from ray._common.utils import get_ray_address_file
recorded = get_ray_address_file(None)
before = open(recorded).read() if os.path.exists(recorded) else None
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": spec["head_cpus"], "include_dashboard": False,
                                                          "node_ip_address": "127.0.0.1"})
if before is None:
    os.remove(recorded)
else:
    open(recorded, "w").write(before)
workers = {}
for index in range(spec["workers"]):
    node = cluster.add_node(num_cpus=spec["worker_cpus"], node_ip_address=f"127.0.0.{index + 2}")
    workers[node.node_id] = node
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "workers": list(workers)}), flush=True)
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    if command == "actors":  # the node of every live actor of a class
        table = cluster.global_state.actor_table(None)
        nodes = [info["Address"]["NodeID"] for info in table.values()
                 if info.get("ActorClassName") == argument and info.get("State") == "ALIVE"]
        print(json.dumps({"nodes": nodes}), flush=True)
    elif command == "remove":
        cluster.remove_node(workers.pop(argument), allow_graceful=False)
        print(json.dumps({"removed": argument}), flush=True)
for node in workers.values():
    cluster.remove_node(node, allow_graceful=False)
cluster.remove_node(cluster.head_node, allow_graceful=False)
"""


class LocalCluster:
    """A head with `head_cpus` CPUs and `workers` worker nodes of `worker_cpus` each, until `close()`."""

    def __init__(self, workers: int = 2, head_cpus: int = 0, worker_cpus: int = 1, timeout: float = 180):
        import json
        import threading

        spec = json.dumps({"workers": workers, "head_cpus": head_cpus, "worker_cpus": worker_cpus})
        self.process = subprocess.Popen([sys.executable, "-c", _CLUSTER, spec], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        timer = threading.Timer(timeout, self.process.kill)
        timer.start()
        try:
            started = self._answer()
        finally:
            timer.cancel()
        self.address: str = started["address"]
        self.workers: list[str] = started["workers"]

    def _answer(self) -> dict:
        import json

        line = self.process.stdout.readline()
        assert line, f"the cluster process ended (status {self.process.poll()})"
        return json.loads(line)

    def _ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def actor_nodes(self, class_name: str) -> list[str]:
        """The node ids of the live actors of `class_name` (e.g. `ServeReplica:<app>:<deployment>`)."""
        return self._ask(f"actors {class_name}")["nodes"]

    def remove_worker(self, node_id: str) -> None:
        """Kill every process of a worker node at once, as a lost machine would."""
        self._ask(f"remove {node_id}")
        self.workers.remove(node_id)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
