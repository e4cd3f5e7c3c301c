"""Safety through the whole job: the replicas decide, the sinks obey, and the output shows every decision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.run import run_job
from factory.jobs.spec import load_spec
from tests.integration.test_job import REPO, results_of

pytestmark = pytest.mark.slow


def assert_images_only_for_passing_rows(storage: Storage, root: str) -> None:
    """Every file under images/ belongs to a row whose safety verdict is pass."""
    by_uri = {row["image_uri"]: row for row in results_of(storage, root) if row["image_uri"]}
    for uri in storage.list_files(storage.join(root, "images")):
        assert uri in by_uri, f"{uri} belongs to no result row"
        assert by_uri[uri]["safety_verdict"] == "pass" and by_uri[uri]["status"] == "ok"


def files_named_for(root: Path, row_id: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix != ".parquet" and row_id in p.name]


def safety_job(tmp_path: Path, name: str, policy: str) -> Path:
    images = tmp_path / "images"
    shutil.copytree(REPO / "jobs" / "data" / "images", images)
    rows = [
        {"id": "astronaut", "tenant": "acme", "task": "caption", "image": "images/astronaut.jpg"},
        {"id": "chelsea", "tenant": "acme", "prompt": "Question: what animal is this?", "image": "images/chelsea.jpg"},
        {"id": "coffee", "tenant": "beta", "task": "caption", "image": "images/coffee.jpg"},
        {"id": "gen-1", "tenant": "acme", "prompt": "a red bicycle poster"},
        {"id": "gen-2", "tenant": "beta", "prompt": "a blue car poster"},
        {"id": "bad-prompt", "tenant": "beta", "prompt": "an explicit poster for the sale"},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\ninputs: [rows.jsonl]\noutput: {tmp_path / 'out'}\n"
        f"defaults: {{steps: 2, width: 128, height: 128}}\nsafety: {policy}\n"
    )
    return spec


def test_a_face_policy_blocks_the_real_photo_and_nothing_of_it_is_written(ray_cluster, tmp_path):
    spec = safety_job(tmp_path, "face", "{thresholds: {FACE_FEMALE: 0.5}, prompt_terms: [explicit]}")
    run_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    root = tmp_path / "out" / "face"
    storage = Storage()
    rows = {row["id"]: row for row in results_of(storage, str(root))}

    astronaut = rows["astronaut"]
    assert astronaut["status"] == "blocked" and astronaut["safety_verdict"] == "blocked"
    assert astronaut["safety_decided_by"] == "image_detector" and astronaut["caption"] is None
    assert dict(zip(astronaut["safety_labels"], astronaut["safety_scores"]))["FACE_FEMALE"] >= 0.5
    assert files_named_for(root, "astronaut") == []

    prompt = rows["bad-prompt"]
    assert (prompt["status"], prompt["safety_decided_by"], prompt["image_uri"]) == ("blocked", "prompt_filter", None)
    assert files_named_for(root, "bad-prompt") == []

    for row_id in ("chelsea", "coffee", "gen-1", "gen-2"):
        assert rows[row_id]["status"] == "ok" and rows[row_id]["safety_verdict"] == "pass", rows[row_id]
    assert rows["gen-1"]["image_uri"] and Path(rows["gen-1"]["image_uri"]).exists()
    assert not (root / "quarantine").exists()
    assert_images_only_for_passing_rows(storage, str(root))
    summary = json.loads((root / "summary.json").read_text())
    assert summary["by_status"] == {"blocked": 2, "ok": 4}


def test_quarantine_writes_flagged_images_only_under_quarantine(ray_cluster, tmp_path):
    from tests.builders import save_tiny_vit

    # The transformers classifier path with fixed logits: it calls every image nsfw, generated or input.
    checkpoint = save_tiny_vit(tmp_path / "vit", bias=(0.0, 3.0))
    spec = safety_job(tmp_path, "quarantine", f"{{detector: {checkpoint}, thresholds: {{nsfw: 0.5}}, action: quarantine, prompt_terms: [explicit]}}")
    run_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    root = tmp_path / "out" / "quarantine"
    storage = Storage()
    rows = results_of(storage, str(root))
    assert len(rows) == 6 and all(row["status"] == "blocked" for row in rows)
    assert all(row["image_uri"] is None for row in rows)
    assert not (root / "images").exists()
    layout = OutputLayout(str(root))
    for row in rows:
        if row["id"] == "bad-prompt":
            assert row["safety_verdict"] == "blocked" and row["quarantine_uri"] is None
            continue
        assert row["safety_verdict"] == "quarantined"
        assert row["quarantine_uri"] == layout.quarantine(row["tenant"], row["id"])
        assert files_named_for(root, row["id"]) == [Path(row["quarantine_uri"])]
    assert_images_only_for_passing_rows(storage, str(root))
