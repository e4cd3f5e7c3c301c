"""What a person sees, and who can reach the Ray that `factory run` starts.

* A private Ray (no --address, no RAY_ADDRESS) listens on loopback only and still requires Ray's token.
* `factory run` prints the progress line and the summary, nothing from Ray, Serve, Ray Data or structlog;
  those go to the log file and Ray's session logs. The same when it joins a running cluster.

Each test starts its own Ray through factory's connect() in a subprocess (really `ray.init` without an
address), so it neither needs nor disturbs the shared test cluster.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# Starts a private Ray exactly as `factory run` does, gets a task worker, an actor and Serve's controller and
# proxy (as deploy() starts it) running, prints the GCS address, and keeps Ray up until stdin closes.
HOST = """
import json, os, sys
import ray
from factory.jobs.cluster import connect

connect()

@ray.remote
def task():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
ray.get([task.remote(), actor.pid.remote()])
from ray import serve
serve.start(http_options={"host": "127.0.0.1"})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address}), flush=True)
sys.stdin.read()
"""

# A second driver joining that Ray by address, with whatever token its environment has.
CLIENT = """
import os, ray
ray.init(address=os.environ["GCS"], log_to_driver=False)

@ray.remote
def answer():
    return 42

print(ray.get(answer.remote(), timeout=60))
"""

PROGRESS = re.compile(r"^[a-z]+ \d+/\d+ +[\d.]+ rows/s( +[a-z]+ \d+)* *$")  # phase, done/total, rate, counts


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "FACTORY_LOG_LEVEL", "FACTORY_LOG_JSON")}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


class PrivateRay:
    def __init__(self, tmp_path: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOST], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=clean_env(FACTORY_LOG_FILE=str(tmp_path / "host.log")),
        )
        line = self._readline(timeout=180)
        assert line, f"the private Ray did not start: {self.process.stderr.read()[-3000:]}"
        self.gcs = json.loads(line)["gcs"]

    def _readline(self, timeout: float) -> str:
        timer = threading.Timer(timeout, self.process.kill)
        timer.start()
        try:
            return self.process.stdout.readline()
        finally:
            timer.cancel()

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def listening(self) -> set[tuple[str, int, str]]:
        """(address, port, process name) of every listening TCP socket and bound UDP socket in its tree."""
        found = set()
        for process in self.processes():
            try:
                name = " ".join(process.cmdline()[:2])[:120]
                for conn in process.net_connections(kind="inet"):
                    listening = conn.status == psutil.CONN_LISTEN
                    bound_udp = conn.type == socket.SOCK_DGRAM and conn.laddr and not conn.raddr
                    if listening or bound_udp:
                        found.add((conn.laddr.ip, conn.laddr.port, name))
            except psutil.Error:
                continue
        return found

    def settled_listening(self, timeout: float = 60) -> set[tuple[str, int, str]]:
        """Some servers (metrics exporters) open a few seconds after ray.init: wait until nothing changes."""
        deadline, previous, stable = time.monotonic() + timeout, None, 0
        while time.monotonic() < deadline:
            current = self.listening()
            stable = stable + 1 if current == previous else 0
            if stable >= 4:
                break
            previous = current
            time.sleep(1)
        return current

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the host exits; ray.shutdown stops the processes it started
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


@pytest.fixture
def private_ray(tmp_path):
    ray = PrivateRay(tmp_path)
    yield ray
    ray.close()


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 on a dual-stack socket
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_private_ray_listens_on_loopback_only_and_requires_the_token(private_ray):
    listening = private_ray.settled_listening()
    names = " ".join(name for _, _, name in listening)
    # It is a Ray of its own (not a `ray start` cluster found on the machine), and the servers are all there.
    for component in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "ray::Actor", "ProxyActor"):
        assert component in names, (component, sorted(listening))
    exposed = sorted(entry for entry in listening if not is_loopback(entry[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"

    # Token auth still guards it. A client on this machine must also see the node as loopback-only: Ray
    # resolves 127.0.0.1 to the machine's routable address unless clusters are disabled, as for factory's own.
    env = clean_env(GCS=private_ray.gcs, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    assert env.get("RAY_AUTH_TOKEN"), "tests/conftest.py sets a token for the session"
    clients = {
        "right token": subprocess.Popen([sys.executable, "-c", CLIENT], env=env, cwd=REPO, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "wrong token": subprocess.Popen([sys.executable, "-c", CLIENT], env={**env, "RAY_AUTH_TOKEN": "0" * 64},
                                        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "no token": subprocess.Popen([sys.executable, "-c", CLIENT], env={**env, "RAY_AUTH_MODE": "disabled"},
                                     cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    }
    results = {name: client.communicate(timeout=180) for name, client in clients.items()}
    assert clients["right token"].returncode == 0 and results["right token"][0].strip() == "42", results
    for name in ("wrong token", "no token"):
        assert clients[name].returncode != 0, (name, results[name])
        assert "Authentication token is missing or incorrect" in results[name][1], (name, results[name][1][-2000:])


def run_factory(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "factory", "run", "jobs/catalog.yaml", "--set", f"output={tmp_path / 'out'}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=540,
        env=clean_env(FACTORY_LOG_FILE=str(tmp_path / "factory.log"), **env),
    )


def assert_quiet(done: subprocess.CompletedProcess, tmp_path: Path) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # stderr: the progress line only (one line every few seconds when it is not a terminal).
    noise = [line for line in done.stderr.splitlines() if not PROGRESS.match(line)]
    assert not noise, "\n".join(noise)
    # stdout: the summary table and its closing line, nothing else.
    lines = done.stdout.rstrip("\n").splitlines()
    # One story of counts (input rows, the rows they became, rejected before the model, ran by status), the same
    # as the progress line's: 41 rows validated, then the 37 that run.
    assert lines[0].strip() == "catalog / catalog" and lines[-1].startswith(
        "41 input rows became 47 rows: 10 rejected before the model, 37 ran (36 ok, 0 blocked, 1 rejected, 0 failed); "
        "30 images in")
    progress = [line.split("  ")[0] for line in done.stderr.splitlines()]
    assert progress[-1] == "rows 37/37" and "validating 41/41" in progress
    assert all(line[:1] in "┏┃┡│├└" for line in lines[1:-1]), done.stdout
    return (tmp_path / "factory.log").read_text()


def test_factory_run_shows_only_progress_and_summary(tiny_path, tmp_path):
    done = run_factory(tmp_path)
    logged = assert_quiet(done, tmp_path)
    # What used to reach the console is in the driver's log file (Ray's C++ notices included).
    assert "Started a local Ray instance" in logged
    assert 'Started Serve in namespace "serve"' in logged and "Deleting app ['factory-catalog']" in logged  # Serve's
    assert "run finished" in logged


def test_factory_run_joining_a_cluster_is_quiet_too(tiny_path, private_ray, tmp_path):
    # The cluster is loopback-only, so this driver must see its node as loopback too (see the token test).
    done = run_factory(tmp_path, "--address", private_ray.gcs, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    logged = assert_quiet(done, tmp_path)
    assert "Connected to Ray cluster" in logged
