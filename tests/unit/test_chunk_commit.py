"""A chunk's life without Ray: validated and staged, duplicates found per shard, results committed in parts."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import (
    RESULT_SCHEMA, ChunkCommitter, CommitConflict, publish, read_parquet_bytes, read_table, write_marker,
)
from factory.jobs.engine.resume import committed_parts, read_committed, stats_of
from factory.jobs.sources.manifests.duplicates import (
    DedupIndex, find_duplicates, key_table, load_duplicates, write_duplicate_rejects,
)
from factory.jobs.sources.manifests.plan import build_plan
from factory.jobs.sources.manifests.validate import STAGED_REQUESTS, VALIDATED, ValidateContext, validate_chunk
from factory.model.profiles import get_profile
from factory.routing.parser import GenerationDefaults
from factory.routing.requests import TaskResult

DEFAULTS = GenerationDefaults(steps=2, width=64, height=64, guidance=0.0)


def context(root) -> ValidateContext:
    return ValidateContext(run_id="r1", layout=OutputLayout(str(root)), storage=Storage(), defaults=DEFAULTS,
                           profile=get_profile("tiny"), shards=4)


def test_validate_chunk_stages_requests_and_writes_rejects_once(tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"id": "a", "tenant": "t1", "prompt": "a cat"},
        {"id": "b", "tenant": "t2", "prompt": "Describe: it", "image": "img/b.png"},
        {"id": "c", "tenant": "t1", "prompt": "x", "width": 100},
        {"id": "d", "tenant": "t1", "colour": "red", "prompt": "x"},
    ]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\nnot json\n")
    chunk = build_plan([str(manifest)], Storage(), 100).chunks[0]
    ctx = context(tmp_path / "out")
    stats, _ = validate_chunk(ctx, chunk)
    assert (stats.rows_read, stats.requests, stats.rejects) == (5, 2, 3)
    assert stats.tasks == {"generate": 1, "caption": 1} and stats.tenants == {"t1": 1, "t2": 1}
    assert stats.reject_fields == {"width": 1, "colour": 1, "row": 1}
    staged = read_parquet_bytes(ctx.storage.read_bytes(ctx.layout.chunk_file(chunk.id, STAGED_REQUESTS)))
    assert staged.column("id").to_pylist() == ["a", "b"] and staged.column("line").to_pylist() == [1, 2]
    assert staged.column("image").to_pylist()[1] == str(tmp_path / "img" / "b.png")  # relative to the manifest
    assert json.loads(ctx.storage.read_bytes(ctx.layout.chunk_file(chunk.id, VALIDATED)))["requests"] == 2
    rejects = read_table(ctx.storage, ctx.layout.rejects, hive=True).to_pylist()
    assert {(r["tenant"], r["manifest_line"], r["field"]) for r in rejects} == {
        ("t1", 3, "width"), ("t1", 4, "colour"), ("_unknown", 5, "row")}  # a line with no row has no tenant
    assert all(r["run_id"] == "r1" and r["manifest"] == str(manifest) for r in rejects)
    assert stats.reject_tenants == {"t1": 2, "_unknown": 1}
    assert sorted(ctx.storage.list_files(ctx.layout.rejects)) == [
        ctx.layout.reject_part(tenant, chunk.id, "rows") for tenant in ("_unknown", "t1")]

    validate_chunk(ctx, chunk)  # a repeat attempt: the same rejects, still one copy of each
    assert read_table(ctx.storage, ctx.layout.rejects, hive=True).num_rows == 3


CHUNKS = [("c0", "m0.jsonl"), ("c1", "m1.jsonl"), ("c2", "m2.jsonl")]  # the plan's order: ordinal -> chunk


def shard_keys(occurrences, shards=1):
    """occurrences: (tenant, id, chunk, ordinal, line) -> one shard's key table."""
    tables = [key_table(pa.array([tenant]), pa.array([i]), pa.array([line], pa.int64()), ordinal=ordinal,
                        shards=shards)
              for tenant, i, _, ordinal, line in occurrences]
    return pa.concat_tables(tables)


def test_the_first_occurrence_in_input_order_owns_an_id_whatever_order_keys_arrive_in(tmp_path):
    occurrences = [("t", "x", "c0", 0, 5), ("t", "x", "c1", 1, 2), ("t", "x", "c0", 0, 9), ("t", "y", "c1", 1, 1),
                   ("t", "z", "c2", 2, 3), ("t", "z", "c2", 2, 4)]
    layout, storage = OutputLayout(str(tmp_path)), Storage()
    answers = []
    for seed in range(4):
        shuffled = occurrences[:]
        random.Random(seed).shuffle(shuffled)
        written = find_duplicates(shard_keys(shuffled), CHUNKS, layout, storage).to_pylist()
        index = DedupIndex(shards=1)
        for row in written:
            index.chunks.setdefault(row["chunk"], []).append(row["shard"])
        answers.append({chunk: load_duplicates(storage, layout, chunk, index) for chunk in ("c0", "c1", "c2")})
    assert all(answer == answers[0] for answer in answers)
    assert answers[0] == {
        "c0": {9: ("x", "m0.jsonl#5")}, "c1": {2: ("x", "m0.jsonl#5")}, "c2": {4: ("z", "m2.jsonl#3")},
    }


def test_duplicate_rejects_name_their_owner_and_leave_counts_of_what_will_not_run(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": i, "tenant": "t", "prompt": "p"}) for i in ["a", "b", "a"]) + "\n")
    chunk = build_plan([str(manifest)], Storage(), 100).chunks[0]
    ctx = context(tmp_path / "out")
    _, staged = validate_chunk(ctx, chunk)
    keys = key_table(staged["tenant"], staged["id"], staged["line"], ordinal=0, shards=1)
    written = find_duplicates(keys, [(chunk.id, chunk.source)], ctx.layout, ctx.storage)
    index = DedupIndex(shards=1, chunks={chunk.id: [written.column("shard")[0].as_py()]})
    removed = write_duplicate_rejects(ctx, chunk, index)
    assert (removed.requests, removed.tenants, removed.tasks) == (1, {"t": 1}, {"generate": 1})
    (reject,) = read_table(ctx.storage, ctx.layout.rejects, hive=True).to_pylist()
    assert (reject["tenant"], reject["manifest_line"], reject["field"]) == ("t", 3, "id")
    assert reject["reason"] == f"duplicate id 'a' (first at {manifest}#1)"
    assert ctx.storage.exists(ctx.layout.reject_part("t", chunk.id, "duplicates"))


def test_ids_are_per_tenant_and_a_duplicate_names_only_its_own_tenants_row(tmp_path):
    # globex's p1 comes first in input order; acme's p1 is not its duplicate, acme's second p1 is acme's.
    occurrences = [("globex", "p1", "c0", 0, 1), ("acme", "p1", "c1", 1, 1), ("acme", "p1", "c1", 1, 4),
                   ("globex", "p2", "c1", 1, 2), ("acme", "p2", "c2", 2, 1), ("globex", "p1", "c2", 2, 5)]
    layout, storage = OutputLayout(str(tmp_path)), Storage()
    written = find_duplicates(shard_keys(occurrences), CHUNKS, layout, storage).to_pylist()
    index = DedupIndex(shards=1)
    for row in written:
        index.chunks.setdefault(row["chunk"], []).append(row["shard"])
    found = {chunk: load_duplicates(storage, layout, chunk, index) for chunk in ("c0", "c1", "c2")}
    assert found == {"c0": {}, "c1": {4: ("p1", "m1.jsonl#1")}, "c2": {5: ("p1", "m0.jsonl#1")}}


def test_one_id_used_by_many_tenants_spreads_over_shards():
    # The shard is a hash of tenant and id: a popular id (every tenant's "1") does not pile into one shard.
    tenants = [f"tenant{n:02d}" for n in range(64)]
    keys = key_table(pa.array(tenants), pa.array(["1"] * 64), pa.array(range(64), pa.int64()), ordinal=0, shards=16)
    assert len(set(keys.column("shard").to_pylist())) > 8


def result_row(row_id: str, tenant: str, status: str = "ok") -> dict:
    result = TaskResult(id=row_id, tenant=tenant, task="generate", status=status, latency_ms=10.0,
                        image_uri=f"img/{row_id}.png" if status == "ok" else None)
    row = result.model_dump(mode="json", exclude={"image_png", "quarantine_png"})
    row.update(attempts=1, run_id="r1", manifest="m.jsonl", manifest_line=1, finished_at=datetime.now(UTC))
    return row


def test_parts_per_tenant_then_failed_rows_uncommitted_for_a_retry(tmp_path):
    layout, storage = OutputLayout(str(tmp_path)), Storage()
    committer = ChunkCommitter(storage, layout, "c0", flush_rows=2, flush_seconds=60)
    for row in (result_row("a", "t1"), result_row("b", "t2", "failed"), result_row("c", "t1", "failed")):
        committer.add(row)
        if committer.due():
            committer.flush()
    committer.flush()
    table = read_table(storage, layout.results, hive=True)
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    for field in RESULT_SCHEMA:
        assert table.schema.field(field.name).type == field.type, field.name
    parts = committed_parts(storage, layout, "c0", ["t1", "t2"])
    assert {tenant: len(uris) for tenant, uris in parts.items()} == {"t1": 2, "t2": 1}
    assert all(f"part-c0-{committer.token}-" in uri for uris in parts.values() for uri in uris)
    assert committed_parts(storage, layout, "c00", ["t1"]) == {"t1": []}  # another chunk's prefix is not ours

    stats = stats_of("c0", read_committed(storage, parts, drop_failed=False), rejects=2)
    assert (stats.rows, stats.rejects, stats.by_status) == (3, 2, {"failed": 2, "ok": 1})
    write_marker(storage, layout, stats)
    assert storage.exists(layout.chunk_file("c0", "failed.json"))

    kept = read_committed(storage, parts, drop_failed=True)
    assert kept.column("id").to_pylist() == ["a"]
    assert sorted(read_table(storage, layout.results, hive=True).column("id").to_pylist()) == ["a"]
    assert committed_parts(storage, layout, "c0", ["t2"]) == {"t2": []}  # a part left empty is deleted


def test_publish_accepts_its_own_bytes_and_refuses_another_writers(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "part.parquet")
    publish(storage, uri, b"mine")
    publish(storage, uri, b"mine")  # a retried PUT whose first answer was lost
    with pytest.raises(CommitConflict):
        publish(storage, uri, b"theirs")
    assert storage.read_bytes(uri) == b"mine"
