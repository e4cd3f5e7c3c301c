"""Parts of the one engine, without Ray: a lost node said once, a worker's failure as one line, replicas given back
only by the run that deployed them, and the archives' duplicates policy (claims during the model stage, links
after)."""

from __future__ import annotations

import asyncio

from factory.errors import FactoryError, StorageUnavailable
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.cluster.nodes import NodeWatch
from factory.jobs.cluster.serve_app import JobApp
from factory.jobs.engine.commit import ChunkCommitter
from factory.jobs.engine.outputs import worker_failure
from factory.jobs.engine.source import Item, RunContext
from factory.jobs.sources.archives.copies import DigestClaims
from factory.jobs.sources.archives.listing import ArchiveChunk
from factory.jobs.sources.archives.rows import ArchiveObject, ArchiveRows
from factory.jobs.spec import ArchiveSpec, JobSpec
from factory.routing.requests import Status


def test_a_lost_node_is_said_once_with_its_address():
    said = []
    watch = NodeWatch(said.append)
    watch.known = {"a" * 56: "127.0.0.1", "b" * 56: "127.0.0.2", "c" * 56: "127.0.0.3"}
    assert watch.check({"a" * 56: "127.0.0.1", "c" * 56: "127.0.0.3"}) == ["b" * 56]
    assert watch.check({"a" * 56: "127.0.0.1"}) == ["c" * 56]
    assert watch.check({"a" * 56: "127.0.0.1"}) == []  # said already
    assert said == [f"warning: Ray node 127.0.0.{n} ({letter * 8}) was lost; its replicas and tasks moved to other "
                    "nodes, and the chunks it held are redone from what they committed"
                    for n, letter in ((2, "b"), (3, "c"))]


class Wrapped(Exception):
    """As Ray wraps a worker's exception: its text a traceback, the exception itself as `cause`."""

    def __init__(self, cause: BaseException):
        super().__init__("Traceback (most recent call last):\n  File \"w.py\", line 1\nStorageUnavailable: ...")
        self.cause = cause


def test_a_workers_failure_is_one_line_with_its_cause_and_how_to_resume():
    error = worker_failure(Wrapped(StorageUnavailable("s3://b/m.jsonl: S3 unavailable (503) after retries")),
                           "nightly", "2026-12-07", "s3://b/out/2026-12-07")
    assert str(error) == ("job nightly: a worker failed: s3://b/m.jsonl: S3 unavailable (503) after retries; committed "
                          "work is kept under s3://b/out/2026-12-07 (re-run with --run-id 2026-12-07 to resume)")
    assert isinstance(error, FactoryError) and "\n" not in str(error)


def test_replicas_are_given_back_only_by_a_run_that_deployed_them_into_its_own_app(monkeypatch):
    from factory.jobs.cluster import serve_app

    released: list[str] = []
    monkeypatch.setattr(serve_app, "release", released.append)
    spec = JobSpec.model_validate({"name": "j", "inputs": ["m.jsonl"], "output": "out"})
    app = JobApp(spec)
    app.release()
    assert released == []  # nothing to do, nothing deployed: a warm app of the same name stays warm
    app.deployed = True
    app.release()
    assert released == ["factory-j"]
    warm = JobApp(spec.model_copy(update={"serve": spec.serve.model_copy(update={"keep_warm": True})}))
    named = JobApp(spec.model_copy(update={"serve": spec.serve.model_copy(update={"app_name": "fleet"})}))
    for kept in (warm, named):
        kept.deployed = True
        kept.release()
    assert released == ["factory-j"] and (named.name, named.owned) == ("fleet", False)


def test_copies_of_an_image_claim_once_and_link_to_the_captioned_row(tmp_path):
    run = RunContext(job="caption", run_id="r", layout=OutputLayout(str(tmp_path / "out")), storage=Storage())
    rows = ArchiveRows(run, ArchiveSpec(sources=[str(tmp_path)], dedup_wait_s=5))
    first, second = (ArchiveChunk(id=f"chunk{n}", source=0, kind="folder", uri=str(tmp_path), names=("x",))
                     for n in (1, 2))

    def item(row_id: str) -> Item:
        return Item(row_id=row_id, tenant="archive", digest="d" * 64,
                    data=ArchiveObject(name=row_id, source_uri=str(tmp_path / row_id), position=0, sha256="d" * 64))

    original, copy_here, copy_there = item("cat.jpg"), item("copy.jpg"), item("other.jpg")
    claims, elsewhere = DigestClaims(run, rows, first), DigestClaims(run, rows, second)
    assert not claims.hold(original)  # the first claims the digest and is captioned
    assert claims.hold(copy_here) and elsewhere.hold(copy_there)  # the others wait for its row
    assert copy_there.data.owner == ("cat.jpg", "chunk1")

    # The captioned row is committed by its chunk; each copy gets a row of its own, linked to it.
    captioned = rows.row(first.uri, "cat.jpg", original.data, Status.OK)
    captioned["caption"] = "a cat"
    committer = ChunkCommitter(run.storage, run.layout, "chunk1", flush_rows=10, flush_seconds=10)
    committer.add(captioned)
    committer.flush()
    linked: list[dict] = []

    async def never(items):
        raise AssertionError(f"{items} should have been linked")

    asyncio.run(elsewhere.link([copy_there], linked.append, never))
    assert [(row["id"], row["duplicate_of"], row["caption"], row["latency_ms"]) for row in linked] == [
        ("other.jpg", "cat.jpg", "a cat", 0.0)]


def test_a_copy_whose_row_never_comes_is_captioned_itself(tmp_path):
    run = RunContext(job="caption", run_id="r", layout=OutputLayout(str(tmp_path / "out")), storage=Storage())
    rows = ArchiveRows(run, ArchiveSpec(sources=[str(tmp_path)], dedup_wait_s=0))
    chunk = ArchiveChunk(id="chunk2", source=0, kind="folder", uri=str(tmp_path), names=("x",))
    copy = Item(row_id="copy.jpg", tenant="archive", digest="e" * 64,
                data=ArchiveObject(name="copy.jpg", source_uri="x", position=0, owner=("gone.jpg", "chunk9")))
    ran: list[list[Item]] = []

    async def run_themselves(items):
        ran.append(items)

    asyncio.run(DigestClaims(run, rows, chunk).link([copy], lambda row: None, run_themselves))
    assert ran == [[copy]]
