"""The source interface (factory.jobs.engine.source), held to one contract by every implementation, without Ray:
manifest files, a catalog (a transform over its product files' records), archives (a folder, a zip, a tar
shard), and a training data set (captioned images in a folder and a tar shard). What Ray Data would run is run
here, in this process, through the same functions: the manifests' validation of each chunk (its pre-pass; the
duplicate barrier is tested in test_chunk_commit), the archives' listing stage, and the training data set's
encoding (its model stage holds the encoders itself: its rows are latents, and its rejects rows of the rejects
table).

The contract: a source plans chunks with a deterministic identity and reads its plan back on a re-run; refuses
inputs that changed since the run began; leaves finished chunks out of the work (failed ones too, unless they are
retried); every input row becomes one item (or one reject before the model stage), exactly once, and an item
already committed is not read again; the tenants a chunk names cover its items; an item's calls are for its row;
its row fits the results table; the plan as it ended names every chunk, and the input rows add up."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from factory.errors import ConfigError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import REJECT_SCHEMA, RESULT_SCHEMA
from factory.jobs.engine.counts import ChunkStats
from factory.jobs.engine.source import Item, ReplicaReader, RunContext, Source
from factory.jobs.run import source_for
from factory.jobs.sources.archives.listing import plan_chunks
from factory.jobs.sources.archives.source import ArchiveSource
from factory.jobs.sources.manifests.duplicates import DedupIndex
from factory.jobs.sources.manifests.source import ManifestSource
from factory.jobs.sources.manifests.validate import validate_chunk
from factory.jobs.sources.training.encode import encoded_row
from factory.jobs.sources.training.source import TrainingSource
from factory.jobs.spec import JobSpec
from factory.model.profiles import get_profile
from factory.model.stack import resolve_sources
from factory.model.training.cache import CACHE_SCHEMA
from factory.model.training.encoders import TrainingEncoders
from factory.routing.batch import ReplicaCall
from factory.routing.executor import base_result
from factory.routing.requests import Status, TaskResult

RUN_ID = "contract"


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Case:
    spec: dict  # the job spec, less name and output
    rows: set[tuple[str, str]]  # (tenant, id) of every row the inputs hold
    rejected: int  # rows rejected before the model stage
    input_rows: int
    change: Path  # an input whose change makes the run's inputs differ


def manifests(folder: Path) -> Case:
    (folder / "img").mkdir()
    (folder / "img" / "cat.png").write_bytes(png(1))
    rows = [{"id": f"g{n}", "tenant": "acme" if n % 2 else "beta", "prompt": f"poster {n}"} for n in range(5)]
    rows += [{"id": "c1", "tenant": "acme", "task": "caption", "image": "img/cat.png"},
             {"id": "bad", "tenant": "acme", "prompt": "x", "width": 100}]
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "more.csv").write_text("id,tenant,prompt\nv1,beta,Question: what is it?\nv2,beta,a lamp\n")
    return Case(spec={"inputs": [str(folder / "rows.jsonl"), str(folder / "more.csv")], "chunk_rows": 3},
                rows={(r["tenant"], r["id"]) for r in rows[:-1]} | {("beta", "v2")}, rejected=2, input_rows=9,
                change=folder / "more.csv")


def catalog(folder: Path) -> Case:
    products = [{"sku": "s1", "tenant": "acme", "name": "shoes"}, {"sku": "s2", "tenant": "acme", "name": "mug",
                                                                     "regions": ["eu"]},
                {"sku": "s3", "tenant": "beta", "name": "lamp", "regions": ["mars"]}]
    (folder / "products.jsonl").write_text("".join(json.dumps(row) + "\n" for row in products))
    spec = {"catalog": {"products": [str(folder / "products.jsonl")], "template": "ad for {name}",
                        "regions": {"eu": {}, "na": {"sizes": [{"width": 64, "height": 96}]}},
                        "checks": [{"name": "visible", "question": "Is it visible?"}]},
            "defaults": {"width": 64, "height": 64}, "chunk_rows": 2}
    rows = {("acme", "s1-eu-64x64-v1"), ("acme", "s1-na-64x96-v1"), ("acme", "s2-eu-64x64-v1")}
    return Case(spec=spec, rows=rows, rejected=1, input_rows=3, change=folder / "products.jsonl")


def archives(folder: Path) -> Case:
    photos = folder / "photos"
    photos.mkdir()
    for n in range(3):
        (photos / f"p{n}.png").write_bytes(png(10 + n))
    (photos / "p0.txt").write_text("a caption: a companion, not a row\n")
    (photos / "broken.jpg").write_bytes(b"not an image")
    with zipfile.ZipFile(folder / "set.zip", "w") as archive:
        archive.writestr("a.png", png(20))
        archive.writestr("b.png", png(21))
    with tarfile.open(folder / "shard.tar", "w") as tar:
        data = png(30)
        info = tarfile.TarInfo("s0.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    spec = {"archive": {"sources": [str(photos), str(folder / "set.zip"), str(folder / "shard.tar")],
                        "question": "Is there text?", "chunk_objects": 2, "tenant": "lib"}}
    ids = {"p0.png", "p1.png", "p2.png", "broken.jpg", "set.zip/a.png", "set.zip/b.png", "shard.tar/s0.png"}
    # 5 names listed in the folder (its companion among them), 2 zip members, the tar's one image.
    return Case(spec=spec, rows={("lib", row_id) for row_id in ids}, rejected=0, input_rows=8,
                change=photos / "p3.png")


def training(folder: Path) -> Case:
    data = folder / "ds"
    data.mkdir()
    for n in range(3):
        (data / f"p{n}.png").write_bytes(png(40 + n))
    (data / "p0.txt").write_text("a chair in the acme style\n")
    (data / "p1.caption").write_text("a lamp in the acme style")
    (data / "p2.json").write_text(json.dumps({"caption": "a table in the acme style"}))
    (data / "orphan.txt").write_text("a caption whose image is missing")
    (data / "nocaption.png").write_bytes(png(50))
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (data / "corrupt.txt").write_text("an image that does not decode")
    with tarfile.open(folder / "shard.tar", "w") as tar:
        for name, member in (("s0.png", png(60)), ("s0.txt", b"a sofa in the acme style")):
            info = tarfile.TarInfo(name)
            info.size = len(member)
            tar.addfile(info, io.BytesIO(member))
    spec = {"train": {"tenant": "acme", "adapter": "style", "sources": [str(data), str(folder / "shard.tar")],
                      "encoding": {"chunk_images": 2}, "options": {"buckets": [{"width": 64, "height": 64}]}}}
    ids = {"0:p0.png", "0:p1.png", "0:p2.png", "0:orphan.txt", "0:nocaption.png", "0:corrupt.png", "1:s0.png"}
    # Every file listed in the folder (captions among them), and the shard's one image, as read.
    return Case(spec=spec, rows={("acme", row_id) for row_id in ids}, rejected=0, input_rows=10 + 1,
                change=data / "p3.png")


KINDS = {"manifests": manifests, "catalog": catalog, "archives": archives, "training": training}


@pytest.fixture(params=list(KINDS))
def case(request, tmp_path) -> tuple[Case, JobSpec]:
    if request.param == "training":
        request.getfixturevalue("tiny_path")  # its model stage encodes with the tiny profile's VAE and text encoders
    folder = tmp_path / "in"
    folder.mkdir()
    made = KINDS[request.param](folder)
    spec = JobSpec.model_validate({"name": "contract", "output": str(tmp_path / "out"), "reuse": False, **made.spec})
    return made, spec


def open_source(spec: JobSpec, states: dict[str, set[str]] | None = None) -> Source:
    """The source of `spec`, planned, and its pre-pass done in this process (what Ray Data runs, one chunk at a
    time: the real validation of each chunk; the inputs hold no repeated id, so the barrier finds none)."""
    layout = OutputLayout(str(Path(spec.output) / RUN_ID))
    source = source_for(spec, RunContext(job=spec.name, run_id=RUN_ID, layout=layout, storage=Storage()))
    source.plan()
    if isinstance(source, ManifestSource):
        ctx = source.context()
        for chunk in source.chunk_plan.chunks:
            validate_chunk(ctx, chunk)
        ctx.storage.write_bytes(layout.dedup_index, DedupIndex(shards=ctx.shards).model_dump_json().encode())
    source.prepare(states or {}, progress=None)
    return source


def chunk_texts(source: Source, work: list[dict]) -> list[str]:
    """The chunks of the pending work, as the stream hands them to the model stage: planned ones as they are, an
    archive source's listing run through its listing stage."""
    texts = []
    for item in work:
        if "chunk" in item:
            texts.append(item["chunk"])
        else:
            assert isinstance(source, ArchiveSource)
            for out in plan_chunks({"item": np.array([json.dumps(item)], dtype=object)}, source.listing()):
                texts.extend(out["chunk"])
    return texts


def results_for(calls: list[ReplicaCall]) -> list[TaskResult]:
    return [base_result(call.request, None, status=Status.OK, caption="words", answer="yes") for call in calls]


@functools.cache
def tiny_encoders() -> TrainingEncoders:
    profile = get_profile("tiny")
    return TrainingEncoders.from_pretrained(resolve_sources(profile)[0], profile.generator)


def run_chunk(source: Source, text: str, committed: pa.Table | None = None) -> tuple[list[Item], list[dict], list]:
    """One chunk through the reader: its items, and the rows made of their (given) results; a training data set's
    items through its model stage's own encoding (the tiny profile's encoders), into latents rows."""
    reader = source.reader()
    chunk = reader.chunk_model.model_validate_json(text)
    opened = reader.open(chunk)
    items = list(opened.items(RESULT_SCHEMA.empty_table() if committed is None else committed))
    rows = []
    for item in items:
        if item.row is not None:
            rows.append(item.row)
            continue
        if not isinstance(reader, ReplicaReader):
            rows.append(encoded_row(tiny_encoders(), item))
            continue
        made = asyncio.run(reader.calls(item))
        results = results_for(made) if isinstance(made, list) else [made]
        if isinstance(made, list):
            assert {(call.request.tenant, call.request.id) for call in made} == {(item.tenant, item.row_id)}
            assert len(made) == item.calls
        rows.append(asyncio.run(reader.row(chunk, item, results, 1 if isinstance(made, list) else 0)))
    return items, rows, opened.tenants


def check_rows(source: Source, items: list[Item], rows: list[dict]) -> ChunkStats:
    """Each item's row is its own and fits the table it is committed to (results; a training data set's latents, or
    its rejects); the chunk's marker as its model stage writes it."""
    marker = ChunkStats(chunk="*")
    for item, row in zip(items, rows, strict=True):
        if isinstance(source, TrainingSource) and item.row is None:
            assert row["id"] == item.row_id and row["image_sha256"] == item.digest
            pa.Table.from_pylist([row], schema=CACHE_SCHEMA)
            marker.add_result(item.tenant, "ok", False, None)
            continue
        assert (row["tenant"], row["id"], row["run_id"]) == (item.tenant, item.row_id, RUN_ID)
        if isinstance(source, TrainingSource):
            pa.Table.from_pylist([row], schema=REJECT_SCHEMA)
            marker.rejects += 1
        else:
            pa.Table.from_pylist([row], schema=RESULT_SCHEMA)
            marker.add_results([row])
    return marker


def test_a_source_plans_the_same_chunks_again_and_reads_every_row_once(case):
    made, spec = case
    source = open_source(spec)
    pending = source.pending({}, retry_failed=True)
    texts = chunk_texts(source, pending.work)
    ids = [json.loads(text)["id"] for text in texts]
    assert len(ids) == len(set(ids)) >= 2

    seen, rejected, markers = [], 0, []
    for text in texts:
        items, rows, tenants = run_chunk(source, text)
        markers.append(check_rows(source, items, rows).model_copy(update={"chunk": json.loads(text)["id"]}))
        assert {item.tenant for item in items} <= set(tenants)
        seen += [(item.tenant, item.row_id) for item in items]
        rejected += source.reader().open(source.reader().chunk_model.model_validate_json(text)).rejects
    assert sorted(seen) == sorted(made.rows)  # each row once
    assert rejected == made.rejected

    again = open_source(spec)  # a re-run: the plan read back, the same chunks
    assert chunk_texts(again, again.pending({}, retry_failed=True).work) == texts
    planned = again.planned()
    assert {chunk_id for chunk_id, _ in planned.chunks} == set(ids)
    assert again.input_rows(markers) == made.input_rows


def test_finished_chunks_are_left_out_and_failed_ones_only_when_not_retried(case):
    _, spec = case
    source = open_source(spec)
    texts = chunk_texts(source, source.pending({}, retry_failed=True).work)
    done, failed = (json.loads(text)["id"] for text in texts[:2])
    states = {done: {"started.json", "done.json"}, failed: {"started.json", "failed.json"}}
    again = open_source(spec, states)
    left = {json.loads(text)["id"] for text in chunk_texts(again, again.pending(states, retry_failed=True).work)}
    kept = {json.loads(text)["id"] for text in chunk_texts(again, again.pending(states, retry_failed=False).work)}
    assert done not in left and failed in left
    assert failed not in kept and kept | {done, failed} == left | {done}


def test_an_item_an_earlier_attempt_committed_is_not_read_again(case):
    _, spec = case
    source = open_source(spec)
    # A chunk whose first item went through the model stage (a training data set commits only those: its rejects
    # are found again).
    text = next(text for text in chunk_texts(source, source.pending({}, retry_failed=True).work)
                if len(items := run_chunk(source, text)[0]) >= 2 and items[0].row is None)
    items, rows, _ = run_chunk(source, text)
    committed = pa.Table.from_pylist(rows[:1], schema=CACHE_SCHEMA if isinstance(source, TrainingSource)
                                     else RESULT_SCHEMA)
    rest, _, _ = run_chunk(source, text, committed)
    assert [(item.tenant, item.row_id) for item in rest] == [(item.tenant, item.row_id) for item in items[1:]]


def test_inputs_changed_since_the_run_began_are_refused(case):
    made, spec = case
    open_source(spec)
    if made.change.exists():
        made.change.write_text(made.change.read_text() + "\n")
        os.utime(made.change, ns=(1, 1))
    else:
        made.change.write_bytes(png(99))
        if spec.archive is not None:
            spec = spec.model_copy(update={"archive": spec.archive.model_copy(update={"chunk_objects": 3})})
    with pytest.raises(ConfigError, match="changed"):
        open_source(spec)
