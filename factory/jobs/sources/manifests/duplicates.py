"""The manifests' duplicates policy: repeated ids across a whole run, found in one barrier before the model
stage, with memory bounded per shard.

Ids are per tenant: two tenants may both use `p1`, and only a tenant's own rows can make its row a duplicate.
Every valid row contributes one key (tenant, id, chunk ordinal, line). Keys are spread over shards of about
`SHARD_KEYS` by a stable hash of (tenant, id) and Ray Data groups them by shard, so a worker holds one shard's
keys at a time (never every id of the run in one process). Within a shard, a (tenant, id) seen more than once is
owned by its first occurrence in input order (plan order of chunks, then line): the same occurrence on every
attempt, whatever order workers ran in. Every other occurrence is written, per chunk, to a small file the chunk's
worker reads to reject those rows, naming the owner: a row of the same tenant.

The barrier (`find_repeated_ids`) runs once per run, fused with validation in one Ray Data pipeline: the chunks
not validated yet are validated and give their keys, the others' keys are read back from their staged requests
(not from the manifests), the keys are grouped by shard, and the chunks that hold repeats write their
duplicates as rejects. `_chunks/dedup.json`, written last, says it is done; a re-run reads it back.

Cost: a key is the tenant and id plus three integers (~50 bytes in Arrow for typical ids), so ten million ids are
200 shards and ~0.5 GB moved once through Ray's object store (spilled to disk past its memory); a shard is ~2.5 MB.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from pydantic import BaseModel, Field

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import parquet_bytes, publish_rejects, read_parquet_bytes
from factory.jobs.engine.counts import ChunkValidation
from factory.jobs.engine.outputs import stage_rows
from factory.jobs.sources.manifests.plan import Chunk, ChunkPlan
from factory.jobs.sources.manifests.validate import (
    STAGED_REQUESTS, VALIDATED, ValidateContext, count_requests, reject_row, staged_requests, validate_chunk,
)

log = structlog.get_logger(__name__)

DUPLICATE_REJECTS = "duplicates"
# Reading and validating is CPU work; half a CPU each lets two chunks share a core with the I/O waits.
VALIDATE_CPUS = 0.5
DUPLICATE_CHUNKS_PER_TASK = 16

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


# ---- the barrier, once per run ---------------------------------------------------------------------------


def chunk_keys(batch: dict[str, np.ndarray], ctx: ValidateContext) -> pa.Table:
    """Ray Data UDF over chunk descriptors: validate each chunk, return its keys for duplicate detection."""
    tables = []
    for text in batch["chunk"]:
        chunk = Chunk.model_validate_json(text)
        stats, staged = validate_chunk(ctx, chunk)
        if ctx.tally is not None:
            ctx.tally.add.remote({"validated_rows": chunk.rows, "rows_read": stats.rows_read,
                                  "rows_read_again": stats.rows_read if stats.read_before else 0})
        tables.append(key_table(staged["tenant"], staged["id"], staged["line"], ordinal=chunk.ordinal,
                                shards=ctx.shards))
    return pa.concat_tables(tables)


def staged_keys(batch: pa.Table, ordinals: dict[str, int], shards: int) -> pa.Table:
    """Ray Data UDF over staged requests read back (tenant, id, line, path): the keys of chunks validated
    earlier."""
    tables = []
    paths = batch["path"]
    for path in pc.unique(paths).to_pylist():
        rows = batch.filter(pc.equal(paths, path))
        tables.append(key_table(rows["tenant"], rows["id"], rows["line"], ordinal=ordinals[path], shards=shards))
    return pa.concat_tables(tables) if tables else KEY_SCHEMA.empty_table()


def write_duplicate_rejects(ctx: ValidateContext, chunk: Chunk, index: DedupIndex) -> ChunkValidation:
    """The chunk's rows whose id an earlier row of the same tenant owns, as rejects naming that owner (never
    another tenant's manifest or line); returns them counted."""
    duplicates = load_duplicates(ctx.storage, ctx.layout, chunk.id, index)
    if not duplicates:
        return ChunkValidation(chunk=chunk.id)
    staged = staged_requests(ctx, chunk.id)
    lines = pa.array(sorted(duplicates), pa.int64())
    repeated = staged.filter(pc.is_in(staged["line"], value_set=lines)).sort_by("line")
    rejects = []
    for row in repeated.to_pylist():
        fields = {k: v for k, v in row.items() if k != "line" and v is not None}
        rejects.append(reject_row(ctx.run_id, chunk.source, row["line"], "id",
                                  f"duplicate id {row['id']!r} (first at {duplicates[row['line']][1]})",
                                  fields, row["id"], row["tenant"]))
    publish_rejects(ctx.storage, ctx.layout, rejects, chunk.id, DUPLICATE_REJECTS, known=ctx.known_tenants)
    return count_requests(chunk.id, repeated, ctx.profile.generator)


def duplicate_rejects(batch: dict[str, np.ndarray], ctx: ValidateContext, index: DedupIndex) -> dict[str, np.ndarray]:
    """Ray Data UDF over the chunks that have duplicates: their rejects, and what they take away from the counts."""
    removed = [write_duplicate_rejects(ctx, Chunk.model_validate_json(text), index) for text in batch["chunk"]]
    return {"removed": np.array([item.model_dump_json() for item in removed], dtype=object)}


def find_repeated_ids(ctx: ValidateContext, plan: ChunkPlan, states: dict[str, set[str]], progress,
                      job: str) -> DedupIndex:
    """Every chunk validated and every repeated id rejected, once per run (`_chunks/dedup.json`, written last,
    says so; a re-run reads it back)."""
    import ray

    storage, layout = ctx.storage, ctx.layout
    if storage.exists(layout.dedup_index):
        return DedupIndex.model_validate_json(storage.read_bytes(layout.dedup_index))
    index = DedupIndex(shards=ctx.shards)
    chunks = plan.chunks
    if chunks:
        progress.phase("validating", sum(chunk.rows for chunk in chunks), "validated_rows")
        found = _keys(ctx, chunks, states).groupby(
            "shard", num_partitions=_shuffle_partitions(ctx.shards),
        ).map_groups(
            find_duplicates, batch_format="pyarrow", num_cpus=VALIDATE_CPUS,
            fn_kwargs={"chunks": [(chunk.id, chunk.source) for chunk in chunks], "layout": layout,
                       "storage": storage},
        )
        started = time.monotonic()
        for row in stage_rows(found, job=job, run_id=ctx.run_id, root=layout.root):
            index.chunks.setdefault(row["chunk"], []).append(int(row["shard"]))
        log.info("chunks validated and duplicate ids found", job=job, run_id=ctx.run_id, chunks=len(chunks),
                 shards=ctx.shards, seconds=round(time.monotonic() - started, 1))
        if index.chunks:
            started = time.monotonic()
            by_id = {chunk.id: chunk for chunk in chunks}
            # A duplicate chunk's work is small (its few repeated rows): several chunks per task.
            written = ray.data.from_items(
                [{"chunk": by_id[chunk_id].model_dump_json()} for chunk_id in sorted(index.chunks)],
                override_num_blocks=max(1, -(-len(index.chunks) // DUPLICATE_CHUNKS_PER_TASK)),
            ).map_batches(duplicate_rejects, batch_size=None, fn_kwargs={"ctx": ctx, "index": index},
                          batch_format="numpy", num_cpus=VALIDATE_CPUS)
            for row in stage_rows(written, job=job, run_id=ctx.run_id, root=layout.root):
                removed = ChunkValidation.model_validate_json(row["removed"])
                index.removed[removed.chunk] = removed
            log.info("duplicates rejected", job=job, run_id=ctx.run_id, chunks=len(index.chunks),
                     rows=sum(removed.requests for removed in index.removed.values()),
                     seconds=round(time.monotonic() - started, 1))
    storage.write_bytes(layout.dedup_index, index.model_dump_json().encode())
    return index


def _shuffle_partitions(shards: int) -> int:
    """Ray's shuffle runs an aggregating actor per partition (its default is 200): one per CPU of the cluster is
    enough to keep it busy. A partition's shards reach the duplicate finder one group at a time."""
    import ray

    return max(1, min(shards, int(ray.cluster_resources().get("CPU", 1))))


def _keys(ctx: ValidateContext, chunks: tuple[Chunk, ...], states: dict[str, set[str]]):
    """Every valid row's key: from validating the chunks not validated yet, and from the staged requests of the
    chunks an earlier attempt validated (read back as columns, not from the manifests)."""
    import ray

    fresh = [chunk for chunk in chunks if VALIDATED not in states.get(chunk.id, ())]
    done = [chunk for chunk in chunks if VALIDATED in states.get(chunk.id, ())]
    branches = []
    if fresh:
        branches.append(ray.data.from_items(
            [{"chunk": chunk.model_dump_json()} for chunk in fresh], override_num_blocks=len(fresh),
        ).map_batches(chunk_keys, batch_size=1, fn_kwargs={"ctx": ctx}, batch_format="numpy",
                      num_cpus=VALIDATE_CPUS))
    if done:
        filesystem, _ = ctx.storage.arrow_filesystem(ctx.layout.root)
        paths = {ctx.storage.arrow_filesystem(ctx.layout.chunk_file(chunk.id, STAGED_REQUESTS))[1]: chunk.ordinal
                 for chunk in done}
        branches.append(ray.data.read_parquet(
            list(paths), filesystem=filesystem, columns=["tenant", "id", "line"], include_paths=True,
        ).map_batches(staged_keys, fn_kwargs={"ordinals": paths, "shards": ctx.shards}, batch_format="pyarrow",
                      batch_size=None, num_cpus=VALIDATE_CPUS))
        if ctx.tally is not None:
            ctx.tally.add.remote({"validated_rows": sum(chunk.rows for chunk in done)})
    return branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
