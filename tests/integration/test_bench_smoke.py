"""Every benchmark run at its smallest size through its real entry point (`python bench/X.py --smoke`, or the
smallest arguments): it finishes, prints its figures and its ratio lines, and every timed run did the work its
figure names: the `WORK` line of each run says all its input rows reached the model (or were validated), and
the run's own `summary.json` agrees. A change to the job spec, the Serve app names or the engine that breaks a
benchmark, or lets a timed run copy instead of work, fails here. (`bench/gpu_flux.py` has its own test.)

One subprocess per benchmark; those on Ray join the session's cluster (`--address`) with small logical CPU
requests, so nothing waits for a Ray start and everything fits the cluster's two CPUs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORK = re.compile(r"^\s*WORK (?P<label>[^:]+): (?P<fields>.*)$")
NUMBER = r"[0-9]+(?:\.[0-9]+)?"

# bench -> (arguments, WORK labels that must appear, lines that must appear: figures and ratios); the first word
# of the name is the script. Those with WORK labels run on Ray.
BENCHES = {
    "pipeline": (
        ["throughput", "--smoke", "--cpus", "0.5"],
        ["bare 0", "factory timed0", "pool 0"],
        [rf'"factory_rows_per_s": {NUMBER}', rf'"bare_rows_per_s": {NUMBER}', rf'"pool_steady_rows_per_s": {NUMBER}',
         rf"^RATIO factory/bare = {NUMBER}, actor pool/bare = {NUMBER}$",
         rf"^RATIO factory/actor pool = {NUMBER} whole run, {NUMBER} steady"],
    ),
    "caption": (
        ["throughput", "--smoke", "--cpus", "0.5"],
        ["bare 0", "factory timed0"],
        [rf'"factory_images_per_s": {NUMBER}', rf'"bare_images_per_s": {NUMBER}', rf"^RATIO factory/bare = {NUMBER}"],
    ),
    "caption first": (
        ["first", "--smoke", "--cpus", "0.5"],
        [],
        [rf'"first_caption_s": {NUMBER}', rf"^FIRST CAPTION after {NUMBER} s"],
    ),
    "lora_switch": (
        ["--smoke", "--cpus", "0.5"],
        ["job shuffled-0", "job grouped-0"],
        [rf"^\s+8\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", rf"^RATIO in-process grouped / shuffled rows/s: {NUMBER}x",
         rf"^\s*grouped switches\s+[0-9]+\s+rows/s\s+{NUMBER}$",
         rf"^RATIO job grouped / shuffled rows/s: {NUMBER}x, switches [0-9]+ -> [0-9]+$"],
    ),
    "serve_load": (
        ["--smoke", "--cpus", "0.5"],
        ["direct 0", "http 0", "grpc 0", "load 1 replica(s) 0", "load 2 replica(s) 0"],
        [rf"^HTTP overhead \(wall - model time\)\s+{NUMBER}\s+{NUMBER}$", rf"^\s+2 replica\(s\): {NUMBER} req/s",
         rf"^OVERHEAD HTTP p50 - direct p50: -?{NUMBER} ms; gRPC p50 - direct p50: -?{NUMBER} ms",
         rf"^RATIO 2 replicas / 1 replica: {NUMBER}x throughput$"],
    ),
    "engine": (
        ["--smoke"],
        ["validate 8192", "validate 16384"],
        [rf"^THROUGHPUT factory validate, 16384 rows: {NUMBER} rows/s", rf"^RATIO peak tree memory 16384/8192 rows = {NUMBER}",
         r"^RESUME rows read again = [0-9]+"],
    ),
    "tasks": (
        ["--repeats", "1"],
        [],
        [rf"^tiny build: {NUMBER} s", rf"^generate 256x256 4 steps, batch 4\s+{NUMBER} ms per call$",
         rf"^vqa, batch 4\s+{NUMBER} ms per call$", rf"^safety detector, 1 image\s+{NUMBER} ms per call$"],
    ),
    "safety_detector": (
        ["--reps", "1"],
        [],
        [rf"^load: first {NUMBER} ms", rf"^512x512 batch 8: {NUMBER} ms per call, {NUMBER} ms/image"],
    ),
}
IN_PROCESS = {"tasks", "safety_detector"}  # no Ray, no engine: nothing to join


def run_bench(name: str, arguments: list[str], address: str | None, tmp_path: Path) -> str:
    script = ROOT / "bench" / f"{name.split()[0]}.py"
    joining = ["--address", address] if address else []
    # TMPDIR: the benchmarks' working folders land under this test's tmp_path, not in /tmp for good.
    done = subprocess.run([sys.executable, str(script), *arguments, *joining], cwd=ROOT,
                          env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def work_lines(stdout: str) -> dict[str, dict[str, str]]:
    found = {}
    for line in stdout.splitlines():
        match = WORK.match(line)
        if match:
            found[match["label"]] = dict(field.split("=", 1) for field in match["fields"].split())
    return found


@pytest.mark.parametrize("name", list(BENCHES))
def test_benchmark_runs_and_every_timed_run_does_its_work(name, request, tiny_path, tmp_path):
    arguments, labels, expected = BENCHES[name]
    address = None if name in IN_PROCESS else request.getfixturevalue("ray_cluster")["address"]
    if name == "serve_load":
        from ray import serve

        # It starts Serve's proxies on ports of its own; a running Serve (a job's) keeps the ports it started with.
        serve.shutdown()
    stdout = run_bench(name, arguments, address, tmp_path)

    for pattern in expected:
        assert re.search(pattern, stdout, re.MULTILINE), f"{name}: no line matches {pattern!r}:\n{stdout[-4000:]}"
    assert "NO RATIO" not in stdout
    runs = work_lines(stdout)
    assert set(labels) <= set(runs), f"{name}: WORK lines {sorted(runs)}, expected {labels}"
    for label, fields in runs.items():
        done = next(value for key, value in fields.items() if key.endswith("_rows") and key != "input_rows")
        assert int(done) == int(fields["input_rows"]) > 0, f"{name} {label}: {fields}"
        assert fields.get("reused", "0") == "0" and fields.get("rows_read_again", "0") == "0", f"{name} {label}: {fields}"
        if "summary" in fields:  # the run's own record, not the benchmark's reading of it
            summary = json.loads(Path(fields["summary"]).read_text())
            assert summary["model_rows"] == summary["rows"] == int(fields["input_rows"]), (label, summary)
            assert summary["reused"] == 0 and summary["rows_read_again"] == 0, (label, summary)
