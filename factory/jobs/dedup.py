"""Duplicate ids across a whole run, with memory bounded per shard.

Ids are per tenant: two tenants may both use `p1`, and only a tenant's own rows can make its row a duplicate.
Every valid row contributes one key (tenant, id, chunk ordinal, line). Keys are spread over shards of about
`SHARD_KEYS` by a stable hash of (tenant, id) and Ray Data groups them by shard, so a worker holds one shard's
keys at a time (never every id of the run in one process). Within a shard, a (tenant, id) seen more than once is
owned by its first occurrence in input order (plan order of chunks, then line): the same occurrence on every
attempt, whatever order workers ran in. Every other occurrence is written, per chunk, to a small file the chunk's
worker reads to reject those rows, naming the owner: a row of the same tenant.

Cost: a key is the tenant and id plus three integers (~50 bytes in Arrow for typical ids), so ten million ids are
200 shards and ~0.5 GB moved once through Ray's object store (spilled to disk past its memory); a shard is ~2.5 MB.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.commit import parquet_bytes, read_parquet_bytes
from factory.jobs.summary import ChunkValidation

# Keys per shard whatever the run's size, so a worker's share of duplicate detection stays the same size.
SHARD_KEYS = 50_000
MAX_SHARDS = 4096

KEY_SCHEMA = pa.schema([("tenant", pa.string()), ("id", pa.string()), ("ordinal", pa.int32()), ("line", pa.int64()),
                        ("shard", pa.int32())])
DUPLICATE_SCHEMA = pa.schema([("line", pa.int64()), ("id", pa.string()), ("owner", pa.string())])


class DedupIndex(BaseModel):
    """Which chunks have duplicate rows, and in which shards' files: written once dedup is complete."""

    shards: int
    chunks: dict[str, list[int]] = Field(default_factory=dict, description="chunk -> shards with duplicate files")
    removed: dict[str, ChunkValidation] = Field(
        default_factory=dict, description="chunk -> the requests rejected as duplicates, counted like a validation"
    )

    def duplicates(self, chunk: str) -> int:
        removed = self.removed.get(chunk)
        return removed.requests if removed is not None else 0


def shard_count(total_rows: int) -> int:
    return max(1, min(MAX_SHARDS, -(-total_rows // SHARD_KEYS)))


def key_table(tenants: pa.Array | pa.ChunkedArray, ids: pa.Array | pa.ChunkedArray,
              lines: pa.Array | pa.ChunkedArray, *, ordinal: int, shards: int) -> pa.Table:
    """One chunk's keys: the tenant and id, where it is (chunk ordinal, line) and its shard (a stable hash of
    tenant/id: a tenant is a name, never containing '/')."""
    count = len(ids)
    shard = np.fromiter((zlib.crc32(f"{tenant}/{row_id}".encode()) % shards
                         for tenant, row_id in zip(tenants.to_pylist(), ids.to_pylist(), strict=True)),
                        dtype=np.int32, count=count)
    return pa.table({
        "tenant": tenants, "id": ids, "ordinal": pa.array(np.full(count, ordinal, dtype=np.int32)), "line": lines,
        "shard": pa.array(shard),
    }, schema=KEY_SCHEMA)


def find_duplicates(keys: pa.Table, chunks: list[tuple[str, str]], layout: OutputLayout, storage: Storage) -> pa.Table:
    """For one shard's keys: write each chunk's non-owner occurrences, return (chunk, shard) per file written.
    `chunks` names each ordinal's chunk and manifest (the plan's order)."""
    written = {"chunk": [], "shard": []}
    if keys.num_rows == 0:
        return pa.table(written, schema=pa.schema([("chunk", pa.string()), ("shard", pa.int32())]))
    identity = ["tenant", "id"]
    counts = keys.group_by(identity).aggregate([("line", "count")])
    repeated = counts.filter(pc.greater(counts["line_count"], 1)).select(identity)
    if repeated.num_rows:
        shard = int(keys["shard"][0].as_py())
        rows = keys.join(repeated, keys=identity, join_type="inner").sort_by(
            [("tenant", "ascending"), ("id", "ascending"), ("ordinal", "ascending"), ("line", "ascending")]
        )
        per_chunk: dict[str, list[tuple[int, str, str]]] = {}
        owner_key, owner = None, ""
        for row in rows.select(["tenant", "id", "ordinal", "line"]).to_pylist():
            chunk, manifest = chunks[row["ordinal"]]
            if (row["tenant"], row["id"]) != owner_key:
                owner_key, owner = (row["tenant"], row["id"]), f"{manifest}#{row['line']}"
                continue
            per_chunk.setdefault(chunk, []).append((row["line"], row["id"], owner))
        for chunk, found in sorted(per_chunk.items()):
            found.sort()
            table = pa.table({
                "line": [line for line, _, _ in found], "id": [i for _, i, _ in found],
                "owner": [o for _, _, o in found],
            }, schema=DUPLICATE_SCHEMA)
            storage.write_bytes(layout.chunk_file(chunk, f"duplicates-{shard:04d}.parquet"), parquet_bytes(table))
            written["chunk"].append(chunk)
            written["shard"].append(shard)
    return pa.table(written, schema=pa.schema([("chunk", pa.string()), ("shard", pa.int32())]))


def load_duplicates(storage: Storage, layout: OutputLayout, chunk: str, index: DedupIndex) -> dict[int, tuple[str, str]]:
    """line -> (id, owner "manifest#line") for this chunk's rows that another occurrence owns."""
    found: dict[int, tuple[str, str]] = {}
    for shard in index.chunks.get(chunk, ()):
        table = read_parquet_bytes(storage.read_bytes(layout.chunk_file(chunk, f"duplicates-{shard:04d}.parquet")))
        for row in table.to_pylist():
            found[row["line"]] = (row["id"], row["owner"])
    return found

