"""Captioning archives end to end on the shared local Ray: a folder, tar shards, a zip and an s3:// prefix mixing
good images of every kind with every kind of bad input; exact counts and reasons, sidecars, exact duplicates,
the safety policy, nothing written outside DEST, and a re-run that writes nothing new."""

from __future__ import annotations

import io
import os
from pathlib import Path

import boto3
import pytest
from PIL import Image

from factory.io.storage import Storage
from factory.jobs.run import run_job
from factory.jobs.sources.archives.source import caption_spec, default_run_id, rows_of
from tests.archives import (
    COMPANION, DUPLICATE, bad_files, build_folder, build_tar_shards, build_zip, good_images,
)

pytestmark = pytest.mark.slow

FAST = ["serve.max_batch_size=4", "in_flight=8", "commit.seconds=1"]


def tree(root: Path) -> dict[str, float]:
    """Every path under root (files, links, fifos) with its modification time, links not followed."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = os.lstat(path).st_mtime_ns
    return found


def by_status(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def test_folder_with_sidecars_duplicates_rejects_and_resume(ray_cluster, tmp_path):
    source, dest = tmp_path / "src", tmp_path / "dest"
    expected = build_folder(source)
    before = tree(tmp_path)
    spec = caption_spec([str(source)], str(dest), sidecars=True, prompt="Describe: one short line",
                        overrides=[*FAST, "archive.chunk_objects=6"])
    run_id = default_run_id(spec)
    summary = run_job(spec, run_id=run_id, show_progress=False)
    root = dest / run_id
    rows = rows_of(Storage(), str(root))

    assert {row["id"]: row["status"] for row in rows} == expected
    assert by_status(rows) == {"ok": 11, "rejected": 8} == summary.by_status
    assert summary.rows == 19 and COMPANION[0] not in {row["member"] for row in rows}
    got = {row["member"]: row for row in rows}
    for name, (_, reason) in bad_files().items():
        assert reason in got[f"bad/{name}"]["error"], (name, got[f"bad/{name}"]["error"])
        assert got[f"bad/{name}"]["caption"] is None and got[f"bad/{name}"]["image_uri"] is None
    assert "a symbolic link (never followed or opened)" in got["bad/link-out.jpg"]["error"]
    assert "a FIFO (never followed or opened)" in got["bad/pipe.jpg"]["error"]
    for name, (_, rule) in good_images().items():
        row = got[f"photos/{name}"]
        assert row["rule"] == rule and row["caption"] and row["safety_verdict"] == "pass", name
        # A duplicate's copy has no model time; which of the two copies claims the digest first is a race
        # between chunks running at once (checked below).
        captioned = row["duplicate_of"] is None
        assert row["profile"] == "tiny" and row["model_version"] and (row["latency_ms"] > 0) == captioned
        assert len(row["sha256"]) == 64 and row["prompt"] == "one short line"
    assert (got["photos/phone-rotated.jpg"]["width"], got["photos/phone-rotated.jpg"]["height"]) == (100, 150)
    assert got["photos/photo_without_extension"]["format"] == "JPEG"

    # The copy is linked to the captioned row, with its caption and no model time; no second dataset file.
    pair = [got[f"photos/{name}"] for name in DUPLICATE]
    copy, original = sorted(pair, key=lambda row: row["duplicate_of"] is None)
    assert copy["duplicate_of"] == original["id"] and copy["sha256"] == original["sha256"]
    assert copy["caption"] == original["caption"] and copy["latency_ms"] == 0.0
    assert all(row["duplicate_of"] is None for row in rows if row is not copy)

    # Sidecars: one image and one .txt per distinct passed image, the .txt holding its caption.
    dataset = sorted(os.listdir(root / "dataset"))
    assert len(dataset) == 20
    for row in rows:
        if row["status"] == "ok" and row["duplicate_of"] is None:
            image = Path(row["image_uri"])
            assert image.parent == root / "dataset" and image.exists()
            assert image.with_suffix(".txt").read_text() == row["caption"]
            Image.open(image).verify()
    assert Path(original["image_uri"]).read_bytes() == (source / original["member"]).read_bytes()
    assert Path(got["photos/phone-rotated.jpg"]["image_uri"]).suffix == ".png"  # the rotated pixels

    # Nothing outside DEST changed (the FIFO was never opened, the link never followed).
    after = tree(tmp_path)
    assert {path: mtime for path, mtime in after.items() if not path.startswith("dest")} == before

    # Running the same command again writes nothing new.
    def written() -> dict[str, float]:  # files only: a folder's mtime moves when summary.json is replaced
        return {path: mtime for path, mtime in tree(dest).items()
                if (dest / path).is_file() and not path.endswith(("summary.json", "_SUCCESS"))}

    first = written()
    again = run_job(spec, run_id=run_id, show_progress=False)
    assert again.by_status == summary.by_status and again.rows_read == 0
    assert written() == first


def test_tar_shards_zip_and_prefix_on_s3_with_a_question_and_a_safety_block(ray_cluster, s3_endpoint, tmp_path):
    from skimage import data

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="archives")
    shards, expected = build_tar_shards(tmp_path, shards=2)
    for shard in shards:
        s3.upload_file(str(shard), "archives", f"shards/{shard.name}")
    expected["shard-002.tar"] = "rejected"  # named by the pattern, not there
    expected.update(build_zip(tmp_path / "photos.zip"))
    s3.upload_file(str(tmp_path / "photos.zip"), "archives", "zips/photos.zip")
    goods = good_images()
    for name in ("chelsea.jpg", "coffee.png"):
        s3.put_object(Bucket="archives", Key=f"prefix/{name}", Body=goods[name][0])
        expected[name] = "ok"
    astronaut = io.BytesIO()
    Image.fromarray(data.astronaut()).save(astronaut, format="JPEG")
    s3.put_object(Bucket="archives", Key="prefix/people/astronaut.jpg", Body=astronaut.getvalue())
    expected["people/astronaut.jpg"] = "blocked"
    s3.put_object(Bucket="archives", Key="prefix/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    expected["broken.png"] = "rejected"

    spec = caption_spec(
        ["s3://archives/shards/shard-{000..002}.tar", "s3://archives/zips/photos.zip", "s3://archives/prefix/"],
        "s3://archives/out", question="What is in the picture?", sidecars=True,
        overrides=[*FAST, "archive.chunk_objects=3", "safety.thresholds={FACE_FEMALE: 0.5}"],
    )
    summary = run_job(spec, run_id="s3run", show_progress=False)
    rows = rows_of(Storage(), "s3://archives/out/s3run")
    assert {row["id"]: row["status"] for row in rows} == expected
    assert summary.by_status == by_status(rows)
    got = {row["id"]: row for row in rows}
    assert "not a tar archive" in got["shard-002.tar"]["error"] or "no such" in got["shard-002.tar"]["error"].lower()
    reasons = {
        "shard-000.tar/../escape.jpg": "climbs out of the archive with '..'",
        "shard-000.tar//etc/absolute.jpg": "has an absolute path",
        "shard-000.tar/soft.jpg": "is a symbolic link to '/etc/passwd' (never followed)",
        "shard-000.tar/hard.jpg": "is a hard link to '000000.jpg' (never followed)",
        "shard-000.tar/dev.jpg": "is a device",
        "shard-000.tar/fifo.jpg": "is a FIFO",
        "photos.zip/../escape.png": "climbs out of the archive with '..'",
        "photos.zip//abs.png": "has an absolute path",
        "photos.zip/imgs/link.png": "is a symbolic link (never followed)",
        "photos.zip/imgs/empty.jpg": "empty file (0 bytes)",
        "broken.png": "not an image",
        **{f"shard-000.tar/bad/{name}": reason for name, (_, reason) in bad_files().items()},
    }
    for row_id, reason in reasons.items():
        assert reason in got[row_id]["error"], (row_id, got[row_id]["error"])
    for row in rows:
        if row["status"] == "ok":
            assert row["caption"] and row["answer"] and row["question"] == "What is in the picture?"
            assert row["image_uri"].startswith("s3://archives/out/s3run/dataset/")
    blocked = got["people/astronaut.jpg"]
    assert blocked["safety_verdict"] == "blocked" and blocked["caption"] is None and blocked["image_uri"] is None
    assert dict(zip(blocked["safety_labels"], blocked["safety_scores"]))["FACE_FEMALE"] >= 0.5
    assert got["shard-000.tar/000000.jpg"]["source_uri"] == "s3://archives/shards/shard-000.tar:000000.jpg"
    # Copies across sources (the same chelsea bytes in a shard, the zip and the prefix) were captioned once.
    chelsea = [row for row in rows if row["sha256"] == got["chelsea.jpg"]["sha256"]]
    assert len(chelsea) == 3 and sum(row["duplicate_of"] is None for row in chelsea) == 1
    assert len({row["caption"] for row in chelsea}) == 1
    # Nothing but the output under the bucket's out/ prefix was written.
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="archives")
            for obj in page.get("Contents", ())]
    assert all(key.startswith(("out/s3run/", "shards/", "zips/", "prefix/")) for key in keys)
    assert len([key for key in keys if not key.startswith("out/")]) == 2 + 1 + 4
    dataset = [key for key in keys if key.startswith("out/s3run/dataset/")]
    distinct_ok = {row["sha256"] for row in rows if row["status"] == "ok"}
    assert len(dataset) == 2 * len(distinct_ok)
