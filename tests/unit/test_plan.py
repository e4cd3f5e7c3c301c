"""Chunk plans: every row in exactly one chunk, read back by range with its own line number, for every format."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.errors import ConfigError
from factory.io.storage import Storage
from factory.jobs.sources.manifests.files import iter_manifest_records, iter_range_records
from factory.jobs.sources.manifests.plan import build_plan, load_or_build_plan


def read_chunks(plan, storage):
    records = []
    for chunk in plan.chunks:
        got = list(iter_range_records(chunk.source, storage, chunk.first_line, chunk.last_line, start=chunk.start,
                                      end=chunk.end, columns=chunk.columns))
        assert all(chunk.first_line <= record.line <= chunk.last_line for record in got), chunk
        records.extend(got)
    return [(record.line, record.raw, record.error) for record in records]


def whole(uri, storage):
    return [(record.line, record.raw, record.error) for record in iter_manifest_records(uri, storage)]


def write_jsonl(path, rows: int, blank_every: int = 0) -> None:
    with path.open("w") as handle:
        for index in range(rows):
            handle.write(json.dumps({"id": f"r{index}", "tenant": "t", "prompt": f"p {index}"}) + "\n")
            if blank_every and index % blank_every == 0:
                handle.write("\n")
        handle.write("{broken\n")


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_jsonl_chunks_cover_every_line_once_with_byte_ranges(tmp_path, chunk_rows):
    path = tmp_path / "m.jsonl"
    write_jsonl(path, 50, blank_every=9)
    storage = Storage()
    plan = build_plan([str(path)], storage, chunk_rows)
    assert all(chunk.start is not None and chunk.rows <= chunk_rows for chunk in plan.chunks)
    assert [c.first_line for c in plan.chunks] == list(range(1, plan.total_rows + 1, chunk_rows))
    assert read_chunks(plan, storage) == whole(str(path), storage)
    assert len({chunk.id for chunk in plan.chunks}) == len(plan.chunks)
    # Deterministic identity: the same inputs give the same chunks.
    assert build_plan([str(path)], storage, chunk_rows) == plan


def test_csv_chunks_never_split_a_quoted_multiline_cell(tmp_path):
    path = tmp_path / "m.csv"
    lines = ["id,tenant,prompt"]
    for index in range(30):
        prompt = f'"line one\nline two of {index}"' if index % 4 == 0 else f"plain {index}"
        lines.append(f"r{index},t,{prompt}")
    lines.append('bad,"t')  # an unclosed quote runs to the end of the file
    path.write_text("\n".join(lines) + "\n")
    storage = Storage()
    for chunk_rows in (1, 2, 5, 100):
        plan = build_plan([str(path)], storage, chunk_rows)
        assert plan.chunks[0].first_line == 2 and plan.chunks[0].columns == ("id", "tenant", "prompt")
        assert read_chunks(plan, storage) == whole(str(path), storage), chunk_rows


def test_gzip_chunks_are_read_from_the_top(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for index in range(40):
            handle.write(json.dumps({"id": f"r{index}", "tenant": "t", "prompt": "p"}) + "\n")
    storage = Storage()
    plan = build_plan([str(path)], storage, 6)
    assert len(plan.chunks) == 7 and all(chunk.start is None for chunk in plan.chunks)
    assert read_chunks(plan, storage) == whole(str(path), storage)


def test_parquet_chunks_read_only_their_rows(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(100)], "tenant": ["t"] * 100, "seed": list(range(100))})
    pq.write_table(table, path, row_group_size=17)
    storage = Storage()
    plan = build_plan([str(path)], storage, 30)
    assert [(c.first_line, c.last_line) for c in plan.chunks] == [(1, 30), (31, 60), (61, 90), (91, 100)]
    assert read_chunks(plan, storage) == whole(str(path), storage)


def test_unreadable_manifests_are_problems_not_failures(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, 3)
    array = tmp_path / "array.jsonl"
    array.write_text('[{"id": 1},\n{"id": 2}]\n')
    header = tmp_path / "dupes.csv"
    header.write_text("id,id\n1,2\n")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello")
    plan = build_plan([str(array), str(good), str(header), str(not_parquet)], Storage(), 100)
    assert [chunk.source for chunk in plan.chunks] == [str(good)]
    reasons = {problem.source: problem.reason for problem in plan.problems}
    assert "JSON array" in reasons[str(array)]
    assert "'id' appears more than once" in reasons[str(header)]
    assert "not a readable Parquet file" in reasons[str(not_parquet)]


def test_a_saved_plan_is_reused_and_changed_inputs_are_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    write_jsonl(path, 20)
    storage = Storage()
    plan_uri = str(tmp_path / "out" / "plan.json")
    first = load_or_build_plan([str(path)], storage, 5, plan_uri)
    assert load_or_build_plan([str(path)], storage, 5, plan_uri) == first
    with pytest.raises(ConfigError, match="chunk_rows was 5, now 6"):
        load_or_build_plan([str(path)], storage, 6, plan_uri)
    with path.open("a") as handle:
        handle.write(json.dumps({"id": "late", "tenant": "t", "prompt": "p"}) + "\n")
    with pytest.raises(ConfigError, match=r"m.jsonl was modified.*another --run-id"):
        load_or_build_plan([str(path)], storage, 5, plan_uri)


def test_s3_chunks_are_ranged_reads(s3_endpoint, tmp_path):
    from tests.s3server import new_bucket

    bucket = new_bucket(s3_endpoint, "plan")
    path = tmp_path / "m.jsonl"
    write_jsonl(path, 33, blank_every=5)
    storage = Storage()
    uri = f"{bucket}/in/m.jsonl"
    storage.write_bytes(uri, path.read_bytes())
    plan = build_plan([uri], storage, 8)
    assert plan.sources[0].size == path.stat().st_size and plan.sources[0].version
    assert read_chunks(plan, storage) == whole(uri, storage)
