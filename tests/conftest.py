"""Shared fixtures. The tiny checkpoints are built once per session into a private FACTORY_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The test cluster uses token auth, as every Ray factory runs on must (`ray start` alone runs with auth off:
# tests/integration/test_ray_token_auth.py starts such a Ray on purpose). Clients that join by address present the
# token only when RAY_AUTH_MODE says so, and Ray reads it when it is first imported: so set it here, first.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    # A fresh machine has no ~/.ray/auth_token; the test cluster gets a token of its own, never a user's.
    import secrets

    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
# On Linux, Ray turns --node-ip-address=127.0.0.1 into the machine's routable address unless multi-node clusters
# are off (as factory's private Ray does, see factory.jobs.cluster): the test cluster then listens on loopback
# only, and every client of it (this process, subprocess drivers, submitted jobs) says the same.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def factory_home(tmp_path_factory) -> Path:
    # Set before anything loads models or starts Ray, so subprocesses and Ray workers inherit it.
    home = Path(os.environ.get("FACTORY_TEST_HOME") or tmp_path_factory.mktemp("factory-home"))
    os.environ["FACTORY_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_path(factory_home) -> Path:
    from factory.model.tiny import ensure_tiny

    return ensure_tiny(factory_home)


@pytest.fixture(scope="session")
def stack(tiny_path):
    from factory.model.stack import ModelStack

    return ModelStack.from_profile("tiny")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> dict[str, Path]:
    """Real photographs that ship with scikit-image, written as files the way users have them."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name in ("astronaut", "chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's server mode) on loopback for the whole session.

    Its variables go into os.environ before Ray starts, so the Ray cluster's workers inherit them.
    """
    from tests.s3server import moto_server, point_environment_at

    with moto_server() as endpoint:
        point_environment_at(endpoint)
        yield endpoint


@pytest.fixture(scope="session")
def ray_cluster(factory_home, tiny_path, s3_endpoint):
    """One local Ray cluster (`ray start --head`, dashboard on loopback) shared by every integration test.

    Started as its own processes rather than inside pytest, so tests can also run drivers in subprocesses
    (kill and resume) and submit jobs through the Jobs API, exactly as users do.
    """
    import subprocess
    import sys
    import tempfile

    import ray

    from factory.jobs.cluster import connect
    from tests.raynodes import agent_port_flags, free_port, stop_cluster

    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    gcs_port, dashboard_port = free_port(), free_port()
    agent_ports = agent_port_flags()
    # A temp dir of its own (short: Ray's socket paths live under it), so teardown stops this cluster only.
    temp_dir = tempfile.mkdtemp(prefix="ray-tests-", dir="/tmp")
    subprocess.run(
        [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", *agent_ports],
        check=True, capture_output=True,
    )
    address = f"127.0.0.1:{gcs_port}"
    connect(address)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    stop_cluster(temp_dir)
