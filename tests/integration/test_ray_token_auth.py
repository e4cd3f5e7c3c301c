"""Token auth where Ray really listens, on Ray heads these tests start themselves with `ray start` (not the shared
test cluster, whose token conftest forces):

* a head started the way infra/cluster.yaml starts one (its flags, its environment, the token from a file) refuses
  Jobs API submissions without the token and takes them with it;
* Ray's real default for `ray start` (no RAY_AUTH_MODE, no token anywhere) is auth off, and `factory` commands
  refuse such a Ray with one line, unless FACTORY_ALLOW_NO_AUTH=1 and it is all on loopback; a private Ray with
  auth off is refused the same way;
* a job's runtime env, as Ray reports it, never holds the Hugging Face token, while its workers still get it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.infra_auth import INFRA, launcher_environment, launcher_head_start
from tests.raynodes import LocalHead, start_head, stop_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
REFUSAL = "runs with token auth off: anyone who reaches it can run code on it"


def bare_env(home: Path) -> dict[str, str]:
    """This environment without any Ray token or address, and a HOME without ~/.ray/auth_token: what a fresh
    machine has (tests/conftest.py sets RAY_AUTH_MODE and RAY_AUTH_TOKEN for the shared cluster)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RAY_AUTH_") and key not in ("RAY_ADDRESS", "HF_TOKEN", "HF_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    return env


def secret_file(path: Path, value: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(value)
    return path


@pytest.fixture(scope="module")
def launcher_head(tmp_path_factory):
    """A head started as infra/cluster.yaml starts one: its `ray start` flags (the launcher's port and autoscaler
    config aside), and the environment its docker run options give the container, the token file where the
    launcher mounts it standing in a file of our own."""
    cluster = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    flags = [flag for flag in launcher_head_start(cluster)
             if flag != "--head" and not flag.startswith(("--port", "--autoscaling-config"))]
    assert "--dashboard-host=127.0.0.1" in flags
    launcher_env, mounts = launcher_environment(cluster)
    assert launcher_env["RAY_AUTH_MODE"] == "token" and launcher_env["RAY_AUTH_TOKEN_PATH"] in mounts
    home = tmp_path_factory.mktemp("home")
    token = secrets.token_hex(32)
    env = {**bare_env(home), **launcher_env,
           "RAY_AUTH_TOKEN_PATH": str(secret_file(home / "ray_auth_token", token))}
    head = start_head(["--include-dashboard=true", *flags], env)
    yield head, token
    stop_cluster(head.temp_dir)


@pytest.fixture(scope="module")
def open_head(tmp_path_factory):
    """`ray start --head` as Ray 2.60 does it by default: no RAY_AUTH_MODE, no token anywhere."""
    head = start_head(["--include-dashboard=true", "--dashboard-host=127.0.0.1"],
                      bare_env(tmp_path_factory.mktemp("home")), num_cpus=2)
    yield head
    stop_cluster(head.temp_dir)


def jobs_api(head: LocalHead, path: str, token: str | None, body: dict | None = None) -> tuple[int, str]:
    """One call to Ray's Jobs REST API (POST with `body`, else GET), with the token as a bearer if given."""
    request = urllib.request.Request(f"{head.dashboard}/api/jobs/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_head_started_like_infra_cluster_yaml_takes_jobs_only_with_the_token(launcher_head):
    head, token = launcher_head
    job = {"entrypoint": "echo submitted-with-the-token"}
    assert jobs_api(head, "", None, job)[0] == 401
    assert jobs_api(head, "", "0" * 64, job)[0] in (401, 403)
    assert jobs_api(head, "", None)[0] == 401  # nor may anyone list the jobs
    status, body = jobs_api(head, "", token, job)
    assert status == 200, body
    submission = json.loads(body)["submission_id"]
    deadline = time.monotonic() + 120
    while (state := json.loads(jobs_api(head, submission, token)[1])["status"]) not in ("SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state == "SUCCEEDED"
    assert "submitted-with-the-token" in jobs_api(head, f"{submission}/logs", token)[1]


# A driver that joins by address through factory's connect() (the token check included) and asks a worker what
# it sees: the Hugging Face token, its runtime env.
DRIVER = """
import json, os, ray
from factory.jobs.cluster import connect

connect(os.environ["GCS"])

@ray.remote
def worker_view():
    import huggingface_hub
    return {"token": huggingface_hub.get_token(), "HF_TOKEN": os.environ.get("HF_TOKEN"),
            "runtime_env": ray.get_runtime_context().runtime_env}

print(json.dumps({"job": ray.get_runtime_context().get_job_id(), "worker": ray.get(worker_view.remote())}))
"""


def test_the_hugging_face_token_reaches_workers_but_never_the_runtime_env(launcher_head, tmp_path):
    head, token = launcher_head
    hf_token = "hf_" + secrets.token_hex(16)
    token_path = secret_file(tmp_path / "hf_token", hf_token)
    env = {**bare_env(tmp_path), "GCS": head.gcs, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "HF_TOKEN": hf_token, "HF_TOKEN_PATH": str(token_path), "FACTORY_LOG_FILE": str(tmp_path / "log")}
    done = subprocess.run([sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Neither the worker's runtime env nor any job the Jobs API reports (below) holds the secret...
    assert hf_token not in json.dumps(seen["worker"]["runtime_env"])
    assert seen["worker"]["runtime_env"]["env_vars"]["HF_TOKEN_PATH"] == str(token_path)
    # ...yet the worker gets it, from the token file the forwarded path names (the node has no HF_TOKEN).
    assert seen["worker"]["token"] == hf_token and seen["worker"]["HF_TOKEN"] is None
    status, body = jobs_api(head, "", token)
    assert status == 200, body
    jobs = {entry["job_id"]: entry for entry in json.loads(body)}
    assert jobs[seen["job"]]["runtime_env"]["env_vars"]["HF_TOKEN_PATH"] == str(token_path)
    assert hf_token not in body


def test_rays_default_for_ray_start_is_auth_off(open_head):
    assert "Token authentication is disabled for this Ray cluster" in open_head.output


def factory(command: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "factory", *command], cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "FACTORY_LOG_FILE": str(tmp_path / f"{command[0]}.log"), **env},
    )


def test_factory_refuses_a_ray_with_auth_off_unless_told_on_loopback(open_head, launcher_head, tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "tenant": "acme", "prompt": "a red bicycle"}\n')
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: authcheck\ninputs: [rows.jsonl]\noutput: {tmp_path / 'out'}\n")
    job = [str(spec)]
    private_env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    drivers = {
        # A client in token mode (as conftest sets) joins an open cluster without noticing: the cluster is asked.
        "run": factory(["run", *job, "--address", open_head.gcs, "--set", f"output={tmp_path / 'refused'}"],
                       tmp_path),
        "serve": factory(["serve", "--address", open_head.gcs], tmp_path, RAY_AUTH_MODE="disabled"),
        # The private Ray `factory run` starts, with its auth turned off.
        "private run": subprocess.Popen(
            [sys.executable, "-m", "factory", "run", *job], cwd=REPO, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**private_env, "RAY_AUTH_MODE": "disabled",
                                         "FACTORY_LOG_FILE": str(tmp_path / "private.log")}),
        # Told, for a Ray all on loopback. Its client has auth off too: the workers of an open Ray send no token,
        # and a driver in token mode would refuse their calls.
        "allowed validate": factory(["validate", *job, "--address", open_head.gcs], tmp_path,
                                    FACTORY_ALLOW_NO_AUTH="1", RAY_AUTH_MODE="disabled"),
        # And a Ray that does check tokens, joined without its token: one line too, not Ray's "failed to connect".
        "no token": factory(["validate", *job, "--address", launcher_head[0].gcs], tmp_path,
                            RAY_AUTH_MODE="disabled"),
    }
    results = {name: (driver.communicate(timeout=300), driver.returncode) for name, driver in drivers.items()}
    for name in ("run", "serve", "private run"):
        (_, stderr), code = results[name]
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: the Ray at 127.0.0.1:"), (name, stderr)
        assert REFUSAL in lines[0] and "FACTORY_ALLOW_NO_AUTH=1" in lines[0], (name, lines[0])
    (_, stderr), code = results["no token"]
    assert code == 2 and stderr.strip().splitlines() == [
        f"error: the Ray at {launcher_head[0].gcs} wants its token, and this process has none or another: set "
        "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH "
        "(README: On a Ray cluster)"], stderr
    (_, stderr), code = results["allowed validate"]
    assert code == 0, stderr[-3000:]
    assert "token auth off, as FACTORY_ALLOW_NO_AUTH=1 allows" in stderr
    assert json.loads((tmp_path / "out" / "authcheck" / "validation.json").read_text())
    assert not (tmp_path / "out" / "authcheck" / "_SUCCESS").exists()  # the refused runs did nothing
    assert not (tmp_path / "refused").exists()  # Ray is joined (and refused) before anything is written, a plan too
