"""The chunked engine under faults, on the shared local Ray: a replica killed mid-job, an S3 endpoint that fails
part of its requests, the driver killed at several points (one of them inside a chunk's commit), failed rows
retried by a re-run, two jobs at once, and `factory validate`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from factory.errors import ConfigError, FactoryError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.run import run_job, validate_job
from factory.jobs.spec import load_spec
from tests.drivers import kill_when, start_driver

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TENANTS = ("acme", "globex", "initech")


def write_rows(path: Path, count: int, duplicate_every: int = 0) -> list[str]:
    """Generation rows over three tenants; with `duplicate_every`, every n-th row repeats the row before it (same
    tenant and id: ids are unique per tenant)."""
    ids = []
    with path.open("w") as handle:
        for index in range(count):
            row_id, tenant = f"row-{index:04d}", TENANTS[index % 3]
            if duplicate_every and index and index % duplicate_every == 0:
                row_id, tenant = f"row-{index - 1:04d}", TENANTS[(index - 1) % 3]
            else:
                ids.append(row_id)
            handle.write(json.dumps({"id": row_id, "tenant": tenant, "prompt": f"poster {index}"}) + "\n")
    return ids


def write_spec(folder: Path, name: str, manifest: str, output: str, extra: str = "") -> Path:
    spec = folder / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\ninputs: [{manifest}]\noutput: {output}\n"
        "defaults: {steps: 1, width: 64, height: 64}\nchunk_rows: 16\n"
        "commit: {rows: 6, seconds: 0.5}\nserve: {num_cpus: 0.5, max_batch_size: 4}\n"
        "retry: {attempts: 6, backoff_s: 0.5, max_backoff_s: 4}\n" + extra
    )
    return spec


def results(root: str) -> list[dict]:
    table = read_table(Storage(), OutputLayout(root).results, hive=True)
    return [] if table is None else table.to_pylist()


def rejects(root: str) -> list[dict]:
    table = read_table(Storage(), OutputLayout(root).rejects, hive=True)
    return [] if table is None else table.to_pylist()


def assert_exactly_once(root: str, ids: list[str], status: str = "ok") -> list[dict]:
    rows = results(root)
    assert sorted(row["id"] for row in rows) == sorted(ids)  # each row present, exactly once
    assert {row["status"] for row in rows} == {status}
    storage = Storage()
    assert storage.exists(OutputLayout(root).success)
    summary = json.loads(storage.read_bytes(OutputLayout(root).summary))
    assert summary["rows"] == len(ids) and summary["by_status"] == {status: len(ids)}
    if status == "ok":
        assert set(storage.list_files(storage.join(root, "images"))) == {row["image_uri"] for row in rows}
    return rows


def replica_actors(app: str, dashboard: str) -> list:
    from ray.util.state import list_actors

    # The state API is addressed explicitly: another Ray on the machine would make its autodetection ambiguous.
    return [actor for actor in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
            if actor.class_name == f"ServeReplica:{app}:StackReplica"]


def test_a_replica_killed_mid_job_is_replaced_and_every_row_ends_ok_once(ray_cluster, tmp_path):
    import ray

    ids = write_rows(tmp_path / "rows.jsonl", 90)
    root = str(tmp_path / "out" / "replicakill")
    spec = load_spec(write_spec(tmp_path, "replicakill", "rows.jsonl", str(tmp_path / "out")))
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault(
        "summary", run_job(spec, address=ray_cluster["address"], show_progress=False)))
    worker.start()
    deadline = time.monotonic() + 240
    while len(results(root)) < 12:
        assert time.monotonic() < deadline and worker.is_alive(), "the job never got going"
        time.sleep(0.2)
    (actor,) = replica_actors("factory-replicakill", ray_cluster["dashboard"])
    ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)  # Serve must start a new one
    worker.join(timeout=400)
    assert not worker.is_alive() and "summary" in outcome
    rows = assert_exactly_once(root, ids)
    assert max(row["attempts"] for row in rows) > 1  # the rows in flight on the dead replica were retried


def test_s3_failing_part_of_its_requests_loses_nothing_and_a_dead_endpoint_is_one_clear_error(
        ray_cluster, s3_endpoint, tmp_path, monkeypatch):
    from tests.faultproxy import fault_proxy
    from tests.s3server import new_bucket

    bucket = new_bucket(s3_endpoint, "faults")
    ids = write_rows(tmp_path / "rows.jsonl", 60)
    Storage().write_bytes(f"{bucket}/in/rows.jsonl", (tmp_path / "rows.jsonl").read_bytes())
    with fault_proxy(s3_endpoint, error_rate=0.12, drop_rate=0.08, seed=5, error_status=500,
                     error_code="InternalError") as proxy:
        # The job's Storage takes its endpoint from the driver's environment and carries it to the workers.
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        spec = load_spec(write_spec(tmp_path, "s3faults", f"{bucket}/in/rows.jsonl", f"{bucket}/out"))
        run_job(spec, address=ray_cluster["address"], show_progress=False)
        assert proxy.errors_injected > 5 and proxy.drops_injected > 3
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        root = f"{bucket}/out/s3faults"
        assert_exactly_once(root, ids)
        # No partial object anywhere: every Parquet file reads whole, every image decodes.
        storage = Storage()
        for uri in storage.list_files(root, suffixes=[".parquet"]):
            from factory.jobs.engine.commit import read_parquet_bytes

            read_parquet_bytes(storage.read_bytes(uri))
        from PIL import Image
        import io

        for uri in storage.list_files(storage.join(root, "images")):
            Image.open(io.BytesIO(storage.read_bytes(uri))).load()

        proxy.configure(fail_all=True)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(FactoryError, match=r"rows.jsonl: S3 unavailable \((InternalError|500)\) after retries"):
            run_job(load_spec(write_spec(tmp_path, "s3down", f"{bucket}/in/rows.jsonl", f"{bucket}/out")),
                    address=ray_cluster["address"], show_progress=False)


@pytest.mark.parametrize("point", ["validate.before_marker", "commit.between_parts"])
def test_driver_killed_at_a_failpoint_then_rerun_gives_every_row_exactly_once(ray_cluster, tmp_path, point):
    ids = write_rows(tmp_path / "rows.jsonl", 80, duplicate_every=9)
    spec = write_spec(tmp_path, "killed", "rows.jsonl", str(tmp_path / "out"))
    root = str(tmp_path / "out" / "killed")
    flag = tmp_path / "reached"
    driver = start_driver("run", spec, ray_cluster["address"], FACTORY_FAILPOINT=f"{point}={flag}")
    kill_when(driver, flag.exists)
    layout, storage = OutputLayout(root), Storage()
    if point == "commit.between_parts":
        # Killed inside a commit: the chunk's first tenant part of that flush is in, the next is not.
        assert 0 < len(results(root)) < len(ids)
    else:
        assert not storage.exists(layout.dedup_index) and not results(root)
    assert not storage.exists(layout.success)

    summary = run_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    assert_exactly_once(root, ids)
    duplicates = [row for row in rejects(root) if row["field"] == "id"]
    assert len(duplicates) == 80 - len(ids) and summary.rejects == len(duplicates)
    assert all("first at" in row["reason"] for row in duplicates)
    if point == "commit.between_parts":
        assert summary.rows_read == 0  # validation had finished: the re-run read no manifest row again


def test_failed_rows_are_retried_by_a_rerun_unless_told_not_to(ray_cluster, tmp_path):
    ids = write_rows(tmp_path / "rows.jsonl", 30)
    spec_path = write_spec(tmp_path, "retries", "rows.jsonl", str(tmp_path / "out"),
                           "error_budget: {max_failed_fraction: 1.0}\n")
    root = str(tmp_path / "out" / "retries")
    first = run_job(load_spec(spec_path, ["row_timeout_s=0.001", "retry.attempts=2", "retry.backoff_s=0"]),
                    address=ray_cluster["address"], show_progress=False)
    assert first.by_status == {"failed": 30}
    failed = results(root)
    assert all(row["attempts"] == 2 and "timed out" in row["error"] for row in failed)

    kept = run_job(load_spec(spec_path), address=ray_cluster["address"], show_progress=False, retry_failed=False)
    assert kept.by_status == {"failed": 30} and len(results(root)) == 30

    run_job(load_spec(spec_path), address=ray_cluster["address"], show_progress=False)
    assert_exactly_once(root, ids)


def test_two_jobs_with_different_configs_run_at_once_in_their_own_apps(ray_cluster, tmp_path):
    from ray import serve

    outcomes: dict = {}
    threads = []
    for name, steps in (("left", 1), ("right", 2)):
        folder = tmp_path / name
        folder.mkdir()
        ids = write_rows(folder / "rows.jsonl", 24)
        spec = load_spec(write_spec(folder, name, "rows.jsonl", str(folder / "out")), [f"defaults.steps={steps}"])

        def run(spec=spec, name=name, ids=ids, folder=folder):
            try:
                run_job(spec, address=ray_cluster["address"], show_progress=False)
                outcomes[name] = assert_exactly_once(str(folder / "out" / name), ids)
            except BaseException as error:  # noqa: BLE001 - reported below
                outcomes[name] = error

        threads.append(threading.Thread(target=run))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert {name: type(value) for name, value in outcomes.items()} == {"left": list, "right": list}, outcomes
    assert {row["steps"] for row in outcomes["left"]} == {1} and {row["steps"] for row in outcomes["right"]} == {2}
    assert not {"factory-left", "factory-right"} & set(serve.status().applications)  # given back after the run


def test_a_job_refuses_a_named_app_that_serves_another_config(ray_cluster, tmp_path):
    from ray import serve

    write_rows(tmp_path / "rows.jsonl", 4)
    shared = ["serve.app_name=shared-fleet", "serve.keep_warm=true"]
    first = write_spec(tmp_path, "owner", "rows.jsonl", str(tmp_path / "out"))
    run_job(load_spec(first, shared), address=ray_cluster["address"], show_progress=False)
    try:
        assert "shared-fleet" in serve.status().applications  # named apps are never deleted by a job
        other = write_spec(tmp_path, "intruder", "rows.jsonl", str(tmp_path / "out"))
        with pytest.raises(ConfigError, match="'shared-fleet' is serving another config"):
            run_job(load_spec(other, [*shared, "serve.max_batch_size=2"]), address=ray_cluster["address"],
                    show_progress=False)
        # The same config joins the warm app instead.
        run_job(load_spec(other, shared), address=ray_cluster["address"], show_progress=False)
    finally:
        serve.delete("shared-fleet")


def test_validate_counts_and_rejects_then_run_reuses_the_validation(ray_cluster, tmp_path):
    catalog = REPO / "jobs" / "catalog.yaml"
    completed = subprocess.run(
        [sys.executable, "-m", "factory", "validate", str(catalog), "--set", f"output={tmp_path}",
         "--address", ray_cluster["address"]],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # 34 manifest rows and 7 catalog products; the products expand into 7 generation rows, 4 edits of the two
    # products' packshots and 2 rejects.
    assert ("41 input rows became 47 rows: 10 rejected before the model (1 duplicate ids, 0 unreadable manifests), "
            "37 would run;") in completed.stdout.replace("\n", " ")
    root = str(tmp_path / "catalog")
    validation = json.loads(Storage().read_bytes(OutputLayout(root).validation))
    assert validation["tasks"] == {"caption": 4, "edit": 4, "generate": 26, "vqa": 3}
    assert validation["tenants"] == {"acme": 16, "globex": 13, "initech": 4, "umbrella": 4}
    assert validation["adapters"]["base"] == 12 and validation["model_seconds"] > 0
    assert len(rejects(root)) == 10 and not results(root)

    spec = load_spec(catalog, [f"output={tmp_path}"])
    summary = run_job(spec, address=ray_cluster["address"], show_progress=False)
    assert summary.rows_read == 0  # validated once: the run did not read the manifests again
    assert (summary.input_rows, summary.rows, summary.rejects) == (41, 37, 10)


def test_validate_killed_part_way_resumes_by_chunk(ray_cluster, tmp_path):
    write_rows(tmp_path / "rows.jsonl", 200, duplicate_every=7)
    spec = write_spec(tmp_path, "validated", "rows.jsonl", str(tmp_path / "out"))
    flag = tmp_path / "reached"
    # Stop the worker on the eighth chunk: chunks before it are validated by then.
    driver = start_driver("validate", spec, ray_cluster["address"], FACTORY_FAILPOINT=f"validate.before_marker[7]={flag}")
    kill_when(driver, flag.exists)
    summary = validate_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    assert summary.rows == 200 and summary.duplicates == 28 and summary.requests == 172
    assert summary.rows_read < 200  # chunks validated before the kill were not read again
    # Read twice: only chunks that were in progress at the kill (at least the one stopped at the failpoint).
    assert 16 <= summary.rows_read_again <= 16 * 4
