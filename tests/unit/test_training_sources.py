"""A training data set's chunks: images paired with their captions (folders, tar shards, a caption run's results),
each brought to its bucket, and every input that cannot become a sample rejected with its reason. No Ray: the
planning and the reader the encoder stage's workers use, called directly (the source's contract with the engine is
tests/unit/test_sources.py's)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.errors import ConfigError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.source import RunContext
from factory.jobs.sources.training.listing import TrainingChunk, plan_chunks
from factory.jobs.sources.training.reader import TrainingReader
from factory.model.training.buckets import nearest_bucket
from factory.model.training.options import Bucket
from tests.training import BAD_INPUTS_REASONS, add_bad_inputs, caption_of, captioned_folder, captioned_tar, png, photo

BUCKETS = [Bucket(width=64, height=64), Bucket(width=96, height=64), Bucket(width=64, height=96)]


NOTHING_COMMITTED = pa.table({"id": pa.array([], pa.string())})


def _read_all(sources: list[str], chunk: int = 64) -> tuple[list[dict], list[dict], list[TrainingChunk]]:
    storage = Storage()
    chunks = list(plan_chunks(sources, storage, chunk).chunks)
    reader = TrainingReader(RunContext(job="train", run_id="r1", layout=OutputLayout("/nowhere"), storage=storage),
                            "acme", BUCKETS)
    samples, rejects = [], []
    for unit in chunks:
        for item in reader.open(unit).items(NOTHING_COMMITTED):
            if item.row is not None:
                rejects.append(item.row)
            else:
                samples.append({**item.data.meta, "pixels": item.data.pixels})
    return samples, rejects, chunks


def test_a_folder_pairs_images_with_captions_and_rejects_the_rest_with_reasons(tmp_path):
    captions = captioned_folder(tmp_path / "ds", ("astronaut", "cat", "coffee"))
    add_bad_inputs(tmp_path / "ds")
    (tmp_path / "ds" / "notes.md").write_text("not training data, not a reject either")

    samples, rejects, _ = _read_all([str(tmp_path / "ds")])

    assert {s["id"]: s["caption"] for s in samples} == {f"0:{name}": text for name, text in captions.items()}
    reasons = {r["id"].removeprefix("0:"): r["reason"] for r in rejects}
    assert set(reasons) == set(BAD_INPUTS_REASONS)
    for name, fragment in BAD_INPUTS_REASONS.items():
        assert fragment in reasons[name], (name, reasons[name])
    cat = next(s for s in samples if s["id"] == "0:cat.png")  # 451x300: landscape
    assert (cat["bucket_width"], cat["bucket_height"]) == (96, 64)
    assert len(cat["pixels"]) == 96 * 64 * 3
    assert Image.frombytes("RGB", (96, 64), cat["pixels"]).getbbox() is not None


def test_units_never_split_an_image_from_its_caption(tmp_path):
    captioned_folder(tmp_path / "ds", ("astronaut", "cat", "chelsea", "coffee"))

    samples, rejects, units = _read_all([str(tmp_path / "ds")], chunk=1)

    assert len(units) == 4 and all(len(unit.names) == 2 for unit in units)
    assert len(samples) == 4 and rejects == []


def test_a_tar_shard_pairs_adjacent_members_with_txt_or_json_captions(tmp_path):
    shard = tmp_path / "shard-000.tar"
    captions = captioned_tar(shard, ("astronaut", "chelsea", "rocket"))

    samples, rejects, units = _read_all([str(shard)])

    assert [unit.kind for unit in units] == ["tar"] and rejects == []
    assert {s["id"]: s["caption"] for s in samples} == {f"0:{name}": text for name, text in captions.items()}
    assert all(s["source_uri"].startswith(f"{shard}:") for s in samples)


def test_a_caption_runs_results_train_from_ok_rows_only(tmp_path):
    images = {name: tmp_path / f"{name}.png" for name in ("astronaut", "coffee")}
    for name, path in images.items():
        path.write_bytes(png(photo(name)))
    rows = [
        {"id": "a", "status": "ok", "caption": caption_of("astronaut"), "image_uri": str(images["astronaut"]),
         "source_uri": "elsewhere", "error": None},
        {"id": "b", "status": "ok", "caption": caption_of("coffee"), "image_uri": None,
         "source_uri": str(images["coffee"]), "error": None},
        {"id": "c", "status": "blocked", "caption": None, "image_uri": None, "source_uri": "x.png", "error": None},
        {"id": "d", "status": "ok", "caption": "in a shard", "image_uri": None,
         "source_uri": f"{tmp_path}/s.tar:k.png", "error": None},
        {"id": "e", "status": "ok", "caption": " ", "image_uri": str(images["coffee"]), "source_uri": "", "error": None},
    ]
    results = tmp_path / "results"
    results.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), results / "part-0.parquet")

    samples, rejects, _ = _read_all([str(results)])

    assert sorted(s["id"] for s in samples) == ["0:a", "0:b"]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["0:c"].startswith("blocked in the caption run")
    assert "--sidecars" in reasons["0:d"]
    assert reasons["0:e"] == "empty caption"


def test_sources_that_cannot_train_are_refused_in_one_line(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "set.zip", "w") as archive:
        archive.writestr("a.png", png(photo("coffee")))
    (tmp_path / "results").mkdir()

    with pytest.raises(ConfigError, match=r"sources\[0\] .*set\.zip: a zip is not a training source"):
        plan_chunks([str(tmp_path / "set.zip")], Storage(), 8)
    with pytest.raises(ConfigError, match=r"sources\[1\] .*results: no \.parquet results files"):
        plan_chunks([str(tmp_path), str(tmp_path / "results")], Storage(), 8)


def test_a_linked_caption_is_refused_not_followed(tmp_path):
    folder = tmp_path / "ds"
    captioned_folder(folder, ("coffee",))
    (folder / "coffee.txt").unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("never read as a caption")
    os.symlink(secret, folder / "coffee.txt")

    samples, rejects, _ = _read_all([str(folder)])

    assert samples == []
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert "symbolic link" in reasons["0:coffee.txt"]
    assert reasons["0:coffee.png"] == "its caption coffee.txt was refused"


def test_nearest_bucket_goes_by_aspect_ratio():
    assert nearest_bucket(451, 300, BUCKETS) == Bucket(width=96, height=64)
    assert nearest_bucket(300, 451, BUCKETS) == Bucket(width=64, height=96)
    assert nearest_bucket(500, 480, BUCKETS) == Bucket(width=64, height=64)
