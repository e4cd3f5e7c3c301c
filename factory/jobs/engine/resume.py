"""What earlier attempts left: where every chunk stands, the rows a chunk committed, and the markers of finished
chunks, so a re-run of the same run skips finished chunks and redoes only the uncommitted rows of the others.

The driver lists the run's `_chunks/` folder once (`chunk_states`); a worker that takes a chunk asks storage
again (`resume_chunk`): Ray Data hands a chunk to another actor when the one working on it dies, within the same
attempt. A chunk that ended with failed rows has them taken out of their parts first (each part replaced whole,
or deleted when nothing else is in it), which makes them uncommitted, so a crash in between leaves them
uncommitted, never twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from factory.errors import FactoryError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import (
    DONE, DONE_WITH_FAILURES, RESULT_SCHEMA, STARTED, parquet_bytes, read_parquet_bytes,
)
from factory.jobs.engine.counts import ChunkStats

log = structlog.get_logger(__name__)

MARKER_READERS = 16


def chunk_states(storage: Storage, layout: OutputLayout) -> dict[str, set[str]]:
    """chunk id -> the names under `_chunks/<chunk>/`, from one listing of the run's `_chunks/`."""
    states: dict[str, set[str]] = {}
    prefix = layout.chunks.rstrip("/") + "/"
    for uri in storage.list_files(layout.chunks):
        relative = uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/_chunks/", 1)[-1]
        chunk, _, name = relative.partition("/")
        if name:
            states.setdefault(chunk, set()).add(name)
    return states


def chunk_finished(names: set[str], retry_failed: bool) -> bool:
    """Whether a chunk whose `_chunks/<chunk>/` holds `names` needs no work this attempt."""
    return DONE in names or (DONE_WITH_FAILURES in names and not retry_failed)


def resume_chunk(storage: Storage, layout: OutputLayout, chunk: str, tenants: list[str], *,
                 retry_failed: bool) -> pa.Table:
    """The rows earlier attempts committed of `chunk` (its tenants' parts), failed ones taken out first when they
    are to be retried; on the chunk's first attempt, its `started` marker naming `tenants`, and no rows.

    A chunk that was started (unfinished, or finished with failures to retry) loses its marker first, so a crash
    from here on leaves it unfinished rather than finished with rows missing."""
    if storage.exists(layout.chunk_file(chunk, STARTED)):
        for name in (DONE, DONE_WITH_FAILURES):
            storage.delete(layout.chunk_file(chunk, name))
        return read_committed(storage, committed_parts(storage, layout, chunk, tenants), drop_failed=retry_failed)
    storage.write_bytes(layout.chunk_file(chunk, STARTED), json.dumps({"tenants": tenants}).encode())
    return RESULT_SCHEMA.empty_table()


def committed_parts(storage: Storage, layout: OutputLayout, chunk: str, tenants: list[str]) -> dict[str, list[str]]:
    """tenant -> result parts of this chunk, by prefix listing of each tenant folder the chunk can write."""
    return {tenant: list(storage.list_prefix(layout.result_prefix(tenant, chunk))) for tenant in tenants}


def read_committed(storage: Storage, parts: dict[str, list[str]], *, drop_failed: bool) -> pa.Table:
    """The chunk's committed result rows (tenant column restored). With `drop_failed`, rows that failed are
    first removed from their parts, so they are no longer committed and can run again."""
    tables = []
    for tenant, uris in parts.items():
        for uri in uris:
            table = read_parquet_bytes(storage.read_bytes(uri))
            if drop_failed:
                kept = table.filter(pc.not_equal(table["status"], "failed"))
                if kept.num_rows < table.num_rows:
                    if kept.num_rows:
                        storage.write_bytes(uri, parquet_bytes(kept))
                    else:
                        storage.delete(uri)
                    log.info("failed rows uncommitted for a retry", part=uri, rows=table.num_rows - kept.num_rows)
                table = kept
            tables.append(table.append_column("tenant", pa.array([tenant] * table.num_rows, pa.string())))
    if not tables:
        return RESULT_SCHEMA.empty_table()
    return pa.concat_tables([table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA) for table in tables])


def row_identity(table: pa.Table) -> pa.ChunkedArray:
    """`tenant/id` per row: ids are unique per tenant only, so another tenant's committed `p1` is not this one's
    (a tenant is a name: it never holds a '/')."""
    return pc.binary_join_element_wise(table["tenant"], table["id"], "/")


def stats_of(chunk: str, committed: pa.Table, rejects: int) -> ChunkStats:
    """A chunk's counts so far: what earlier attempts committed, and its rows rejected before the model stage."""
    stats = ChunkStats(chunk=chunk, rejects=rejects)
    stats.add_results(committed.select(["tenant", "status", "image_uri", "latency_ms", "reused_from"]).to_pylist())
    return stats


def read_markers(storage: Storage, layout: OutputLayout, chunks: Sequence[tuple[str, str]],
                 states: dict[str, set[str]], fresh: dict[str, ChunkStats]) -> list[ChunkStats]:
    """Every chunk's marker, for `chunks` as (chunk id, its source as the error names it): this attempt's from
    the workers' output, earlier attempts' from storage. A chunk not finished this attempt was skipped as
    finished, so the start-of-run `states` already say which marker it has: no lookup per chunk."""
    def read(chunk: tuple[str, str]) -> ChunkStats:
        chunk_id, source = chunk
        if chunk_id in fresh:
            return fresh[chunk_id]
        for name in (DONE, DONE_WITH_FAILURES):
            if name in states.get(chunk_id, ()):
                return ChunkStats.model_validate_json(storage.read_bytes(layout.chunk_file(chunk_id, name)))
        raise FactoryError(f"chunk {chunk_id} of {source} has no marker: the run did not finish it")

    with ThreadPoolExecutor(MARKER_READERS) as pool:
        return list(pool.map(read, chunks))
