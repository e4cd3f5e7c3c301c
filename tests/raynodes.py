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
