"""The main job end to end on one shared local Ray: Ray Data -> Serve replicas -> Parquet and images,
against a local folder and a real S3-compatible server over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import RESULT_SCHEMA, read_table
from factory.jobs.run import JobAborted, run_job
from factory.jobs.spec import load_spec
from tests.drivers import kill_when, start_driver

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "jobs" / "catalog.yaml"
EXPECTED_REJECTS = {  # manifest row id (or None) -> field the reject names
    "bad-width": "width", "bad-task": "task", None: "row", "bad-no-image": "image", "umbrella-bad-1": "seed",
    "acme-eu-001": "id", "bad-tenant": "tenant", "bad-adapter": "adapter",
    "lamp-400": "regions", "mug-500": "name",  # catalog products that cannot expand
}
CATALOG_ROWS = {  # products.jsonl x the spec's regions: id -> (region, adapter)
    "shoe-100-eu-256x256-v1": ("eu", "acme/eu-minimal"), "shoe-100-na-256x256-v1": ("na", "acme/na-contrast"),
    "espresso-200-eu-256x256-v1": ("eu", "acme/eu-minimal"), "espresso-200-na-256x256-v1": ("na", "acme/na-contrast"),
    "espresso-200-apac-256x384-v1": ("apac", "acme/brand"), "tent-300-eu-256x256-v1": ("eu", "globex/brand"),
    "tent-300-apac-256x384-v1": ("apac", "globex/apac-bold"),
    # products with a packshot: edits of it, per region
    "cup-600-eu-256x256-v1": ("eu", "acme/eu-minimal"), "cup-600-na-256x256-v1": ("na", "acme/na-contrast"),
    "rocket-700-eu-256x256-v1": ("eu", "globex/brand"), "rocket-700-apac-256x384-v1": ("apac", "globex/apac-bold"),
}
MADE = ("generate", "edit")  # tasks whose result is an image the generator made


def results_of(storage: Storage, root: str) -> list[dict]:
    table = read_table(storage, OutputLayout(root).results, hive=True)
    return [] if table is None else table.to_pylist()


def rejects_of(storage: Storage, root: str) -> list[dict]:
    table = read_table(storage, OutputLayout(root).rejects, hive=True)
    return [] if table is None else table.to_pylist()


def check_catalog_output(storage: Storage, root: str, performance: str = "plain") -> None:
    layout = OutputLayout(root)
    results = results_of(storage, root)
    # Every generated or edited row says how it was made; caption and VQA rows do not use the generator.
    assert {row["performance"] for row in results if row["task"] in MADE} == {performance}
    assert {row["performance"] for row in results if row["task"] not in MADE} == {None}
    ids = [row["id"] for row in results]
    assert len(ids) == len(set(ids)) == 37
    statuses = {}
    for row in results:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    assert statuses == {"ok": 36, "rejected": 1}
    by_id = {row["id"]: row for row in results}
    for row_id, (region, adapter) in CATALOG_ROWS.items():
        row = by_id[row_id]
        assert (row["region"], row["adapter"], row["status"]) == (region, adapter, "ok"), row_id
        assert dict(row["checks"])["product_visible"], row_id  # the expansion's VQA check, answered
    assert by_id["tent-300-apac-256x384-v1"]["prompt"] == "advertisement for camping tent, new arrival, bright playful style"
    rocket = by_id["rocket-700-apac-256x384-v1"]
    assert rocket["task"] == "edit" and rocket["prompt"] == ("place the product on a cafe table in Tokyo, bright playful "
                                                             "style; keep the product unchanged")
    assert rocket["reference_uris"][0].endswith("images/rocket.jpg") and len(rocket["reference_sha256"][0]) == 64
    assert (rocket["width"], rocket["height"]) == (256, 384)
    # Each row ran with exactly its adapter: region adapter, explicit name, tenant default, or none.
    assert by_id["acme-eu-002"]["adapter"] == "acme/eu-minimal" and by_id["acme-na-004"]["adapter"] == "acme/na-contrast"
    assert by_id["acme-eu-brand"]["adapter"] == "acme/brand" and by_id["globex-eu-007"]["adapter"] == "globex/brand"
    assert by_id["initech-na-013"]["adapter"] is None and by_id["acme-cap-001"]["adapter"] is None
    assert len(by_id["acme-eu-002"]["adapter_sha256"]) == 64
    missing = next(row for row in results if row["id"] == "bad-missing-image")
    assert missing["status"] == "rejected" and "no such file" in missing["error"]

    table = read_table(storage, layout.results, hive=True)
    for field in RESULT_SCHEMA:
        assert table.schema.field(field.name).type == field.type, field.name

    # An image for every ok generation or edit row, at the key its row names, and for no other row.
    expected_images = {row["image_uri"] for row in results if row["task"] in MADE and row["status"] == "ok"}
    assert len(expected_images) == 30 and None not in expected_images
    assert all(row["image_uri"] is None for row in results if row["task"] not in MADE)
    assert set(storage.list_files(storage.join(root, "images"))) == expected_images
    seeded = next(row for row in results if row["id"] == "initech-gen-seeded")
    assert (seeded["seed"], seeded["width"], seeded["height"]) == (7, 256, 192)
    assert seeded["image_uri"] == layout.image("initech", "initech-gen-seeded")
    for row in results:
        if row["task"] == "caption" and row["status"] == "ok":
            assert row["caption"]
        if row["task"] == "vqa":
            assert row["answer"] and row["question"]

    rejects = rejects_of(storage, root)
    assert {row["id"]: row["field"] for row in rejects} == EXPECTED_REJECTS
    # Each in its tenant's folder; a row of no registered tenant (or no row at all) in _unknown.
    assert {row["id"]: row["tenant"] for row in rejects} == {
        "bad-width": "acme", "bad-task": "globex", None: "_unknown", "bad-no-image": "acme",
        "umbrella-bad-1": "umbrella", "acme-eu-001": "acme", "bad-tenant": "_unknown", "bad-adapter": "globex",
        "lamp-400": "acme", "mug-500": "globex"}
    assert all(row["reason"] and row["manifest"] and row["manifest_line"] for row in rejects)
    duplicate = next(row for row in rejects if row["field"] == "id")
    assert "duplicate id 'acme-eu-001'" in duplicate["reason"]

    by_uri = {row["image_uri"]: row for row in results}
    assert all(by_uri[uri]["safety_verdict"] == "pass" for uri in expected_images)
    assert all(row["safety_verdict"] == "pass" for row in results if row["status"] == "ok")

    assert storage.exists(layout.success)
    summary = json.loads(storage.read_bytes(layout.summary))
    assert (summary["rows"], summary["rejects"], summary["images"]) == (37, 10, 30)
    assert summary["by_status"] == {"ok": 36, "rejected": 1}
    assert set(summary["tenants"]) == {"acme", "globex", "initech", "umbrella"}
    assert summary["tenants"]["acme"]["compute_seconds"] > 0


def test_catalog_to_local_folder_and_rerun_writes_nothing_twice(ray_cluster, tmp_path):
    spec = load_spec(CATALOG, [f"output={tmp_path}"])
    run_job(spec, address=ray_cluster["address"], show_progress=False)
    root = str(tmp_path / "catalog")
    storage = Storage()
    check_catalog_output(storage, root)

    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    run_job(spec, address=ray_cluster["address"], show_progress=False)
    check_catalog_output(storage, root)
    files_after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    assert files_after == files_before  # every row was already committed: no new result or reject files


def test_catalog_on_s3_over_http(ray_cluster, s3_endpoint, tmp_path):
    from tests.s3server import new_bucket

    bucket = new_bucket(s3_endpoint, "catalog")
    storage = Storage()
    data = REPO / "jobs" / "data"
    for path in data.rglob("*"):
        if path.is_file() and path.name != "products.jsonl":
            storage.write_bytes(f"{bucket}/in/{path.relative_to(data).as_posix()}", path.read_bytes())
    # The product catalog lives apart from the manifests (the in/ prefix is read as manifests, whole), its
    # products' packshots beside it.
    storage.write_bytes(f"{bucket}/catalog/products.jsonl", (data / "products.jsonl").read_bytes())
    for path in (data / "images").glob("*.jpg"):
        storage.write_bytes(f"{bucket}/catalog/images/{path.name}", path.read_bytes())
    # The registry stays a local file; the adapters it names are on S3.
    for path in (REPO / "jobs" / "adapters").glob("*.safetensors"):
        storage.write_bytes(f"{bucket}/adapters/{path.name}", path.read_bytes())
    registry = (REPO / "jobs" / "tenants.yaml").read_text().replace("uri: adapters/", f"uri: {bucket}/adapters/")
    (tmp_path / "tenants.yaml").write_text(registry)
    spec_path = tmp_path / "catalog.yaml"
    spec_path.write_text(CATALOG.read_text())
    # A job's speed option replaces the profile's and reaches every replica and every result row.
    spec = load_spec(spec_path, [f"inputs=['{bucket}/in/']", f"output={bucket}/out",
                                 f"catalog.products=['{bucket}/catalog/products.jsonl']",
                                 "performance.vae_channels_last=true"])
    run_job(spec, address=ray_cluster["address"], show_progress=False)
    check_catalog_output(storage, f"{bucket}/out/catalog", performance="vae=channels_last")


def write_generation_manifest(path: Path, rows: int, tenants=("acme", "globex", "initech")) -> list[str]:
    ids = [f"row-{index:04d}" for index in range(rows)]
    with path.open("w") as handle:
        for index, row_id in enumerate(ids):
            tenant = tenants[index % len(tenants)]
            handle.write(json.dumps({"id": row_id, "tenant": tenant, "prompt": f"poster number {index}"}) + "\n")
    return ids


def small_spec(tmp_path: Path, manifest: Path, name: str) -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\ninputs: [{manifest}]\noutput: {tmp_path / 'out'}\n"
        "defaults: {steps: 2, width: 128, height: 128}\ncommit: {rows: 8, seconds: 0.5}\n"
    )
    return spec


def test_driver_killed_part_way_then_rerun_has_every_row_exactly_once(ray_cluster, tmp_path):
    ids = write_generation_manifest(tmp_path / "rows.jsonl", 360)
    spec_path = small_spec(tmp_path, tmp_path / "rows.jsonl", "resume")
    root = str(tmp_path / "out" / "resume")
    storage = Storage()
    driver = start_driver("run", spec_path, ray_cluster["address"])
    kill_when(driver, lambda: len(results_of(storage, root)) >= 40)
    committed = results_of(storage, root)
    assert 40 <= len(committed) < len(ids), "the kill must land part-way"
    assert not storage.exists(OutputLayout(root).success)

    run_job(load_spec(spec_path), address=ray_cluster["address"], show_progress=False)
    final = results_of(storage, root)
    final_ids = [row["id"] for row in final]
    assert sorted(final_ids) == sorted(ids)  # each row present, exactly once
    assert all(row["status"] == "ok" for row in final)
    images = set(storage.list_files(storage.join(root, "images")))
    assert images == {row["image_uri"] for row in final}
    assert storage.exists(OutputLayout(root).success)
    assert json.loads(storage.read_bytes(OutputLayout(root).summary))["rows"] == len(ids)


def test_error_budget_stops_the_job_and_keeps_what_was_written(ray_cluster, tmp_path):
    write_generation_manifest(tmp_path / "rows.jsonl", 60)
    spec = load_spec(small_spec(tmp_path, tmp_path / "rows.jsonl", "budget"),
                     ["row_timeout_s=0.001", "error_budget.max_failed=5"])
    with pytest.raises(JobAborted, match="over the error budget"):
        run_job(spec, address=ray_cluster["address"], show_progress=False)
    root = str(tmp_path / "out" / "budget")
    storage = Storage()
    failed = [row for row in results_of(storage, root) if row["status"] == "failed"]
    assert len(failed) > 5 and all("timed out" in row["error"] for row in failed)
    assert not storage.exists(OutputLayout(root).success)


def test_factory_submit_runs_the_job_through_the_jobs_api(ray_cluster, tmp_path):
    output = tmp_path / "submitted"
    completed = subprocess.run(
        [sys.executable, "-m", "factory", "submit", "jobs/catalog.yaml", "--address", ray_cluster["dashboard"],
         "--set", f"output={output}", "--run-id", "submitted"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    check_catalog_output(Storage(), str(output / "submitted"))


def test_a_submitted_job_refuses_an_output_inside_rays_copy_of_its_working_dir(ray_cluster):
    # As a new user would: the spec's relative `output: out` would resolve inside Ray's working-dir copy.
    completed = subprocess.run(
        [sys.executable, "-m", "factory", "submit", "jobs/catalog.yaml", "--address", ray_cluster["dashboard"],
         "--run-id", "ephemeral"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0 and "job ended FAILED" in output
    assert "inside Ray's temporary copy of the job's working directory" in output
    assert "pass an s3:// URI or an absolute path" in output and "Traceback" not in output
