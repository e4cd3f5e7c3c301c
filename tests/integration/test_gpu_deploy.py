"""On the CPU-only test cluster, a job whose replicas need a GPU stops at once with one line, and replicas that
cannot be placed stop the run at serve.ready_timeout_s instead of holding it forever."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.errors import ModelError
from factory.jobs.run import run_job
from factory.jobs.spec import load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"^[a-z]+ \d+/\d+ +[\d.]+ rows/s( +[a-z]+ \d+)* *$")  # as in test_console.py


def tiny_job(tmp_path: Path, name: str) -> Path:
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text('{"id": "a", "tenant": "acme", "prompt": "a red bicycle"}\n')
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\ninputs: [{manifest}]\noutput: {tmp_path / 'out'}\nprofile: tiny\n"
                    "defaults: {steps: 1, width: 64, height: 64}\n")
    return spec


def test_a_replica_needing_a_gpu_on_a_cluster_without_one_fails_fast_in_one_line(ray_cluster, tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "factory", "run", str(tiny_job(tmp_path, "gpuless")), "--address",
         ray_cluster["address"], "--set", "serve.num_gpus=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: serve.num_gpus: profile 'tiny' needs 1 GPU per replica, the Ray cluster has 0 GPUs; run it on a "
        "cluster with GPUs, set serve.num_gpus: 0 to run the profile on CPU, or serve.gpus_on_demand: true if the "
        "cluster adds GPU nodes when asked"
    ], output[-3000:]
    assert "Traceback" not in output
    noise = [line for line in done.stderr.splitlines() if not line.startswith("error:") and not PROGRESS.match(line)]
    assert noise == [], output[-3000:]
    assert seconds < 45, f"took {seconds:.0f} s"


def test_replicas_that_cannot_be_placed_stop_the_run_at_the_ready_deadline(ray_cluster, tmp_path):
    # More CPUs per replica than the 2-CPU test cluster has: Serve would wait for them forever.
    spec = load_spec(tiny_job(tmp_path, "unplaceable"), ["serve.num_cpus=64", "serve.ready_timeout_s=3"])
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"^serve\.ready_timeout_s: the replicas of Serve app 'factory-unplaceable' "
                                         r"did not start within 3 s"):
        run_job(spec, address=ray_cluster["address"], show_progress=False)
    assert time.monotonic() - started < 120  # validation, Serve's start and the app's deletion included
    from ray import serve

    assert "factory-unplaceable" not in serve.status().applications  # given back, as after any run
