"""Committing a chunk's output: whole Parquet parts named by (chunk, writer, sequence), then a marker.

A row is committed when its result row is in a results part. A part appears whole or not at all (written to a
temporary name and renamed locally; one PUT on S3, where an object is visible only once complete), and is
published only if nothing is at its name yet (a conditional put), so a retried or zombie writer can never
replace a part. Before a chunk's first part, a `started` marker names the tenants the chunk can write, so a
later attempt finds that chunk's parts with a few prefix listings instead of listing the whole output (see
`factory.jobs.engine.resume`). When the chunk is done, its marker (`done.json`, or `failed.json` when some rows
failed) holds its counts. Rejects are published the same way, one part per tenant folder.
"""

from __future__ import annotations

import io
import time
import uuid
from collections import defaultdict
from collections.abc import Collection

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import structlog

from factory.errors import FactoryError
from factory.io.layout import UNATTRIBUTED, OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.counts import ChunkStats
from factory.jobs.engine.faults import failpoint
from factory.routing.tenants import is_name

log = structlog.get_logger(__name__)

STARTED, DONE, DONE_WITH_FAILURES = "started.json", "done.json", "failed.json"

RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("tenant", pa.string()), ("region", pa.string()), ("task", pa.string()),
    ("status", pa.string()), ("prompt", pa.string()), ("question", pa.string()), ("caption", pa.string()),
    ("answer", pa.string()),
    ("image_uri", pa.string()), ("source_uri", pa.string()),
    # Edit rows: the reference images in order, and the sha256 of each one's bytes as read (what reuse keys on).
    ("reference_uris", pa.list_(pa.string())), ("reference_sha256", pa.list_(pa.string())), ("adapter", pa.string()),
    ("adapter_sha256", pa.string()), ("profile", pa.string()), ("model_version", pa.string()),
    ("performance", pa.string()), ("checks", pa.map_(pa.string(), pa.string())), ("reused_from", pa.string()),
    ("seed", pa.int64()), ("steps", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("guidance", pa.float64()), ("latency_ms", pa.float64()), ("safety_ms", pa.float64()),
    ("error", pa.string()), ("attempts", pa.int32()),
    ("safety_verdict", pa.string()), ("safety_decided_by", pa.string()), ("safety_labels", pa.list_(pa.string())),
    ("safety_scores", pa.list_(pa.float64())), ("safety_reason", pa.string()), ("quarantine_uri", pa.string()),
    ("run_id", pa.string()), ("manifest", pa.string()), ("manifest_line", pa.int64()),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    # Archive rows (factory caption): the member read, its bytes' digest, the decoded format, the image rule
    # applied (factory.io.images), and for an exact duplicate the id of the row that was captioned for it.
    ("member", pa.string()), ("sha256", pa.string()), ("format", pa.string()), ("rule", pa.string()),
    ("duplicate_of", pa.string()),
    # Quality (README "Quality"): what a row is scored against, kept so `factory eval` can score it again, and its
    # own scores. BLEU's counts, not only its sentence score, so a group's BLEU is that of its summed counts.
    ("references", pa.list_(pa.string())), ("answers", pa.list_(pa.string())), ("clip_score", pa.float64()),
    ("vqa_accuracy", pa.float64()), ("bleu4", pa.float64()), ("bleu_candidate_length", pa.int32()),
    ("bleu_reference_length", pa.int32()), ("bleu_guesses", pa.list_(pa.int32())),
    ("bleu_matches", pa.list_(pa.int32())), ("quality_ms", pa.float64()),
])
PART_SCHEMA = pa.schema([field for field in RESULT_SCHEMA if field.name != "tenant"])  # tenant is in the path

REJECT_SCHEMA = pa.schema([
    ("manifest", pa.string()), ("manifest_line", pa.int64()), ("id", pa.string()), ("tenant", pa.string()),
    ("field", pa.string()), ("reason", pa.string()), ("row", pa.string()), ("run_id", pa.string()),
])


class CommitConflict(FactoryError):
    """Something other than this writer's bytes is at a name only this writer uses."""


TENANT_PARTITIONING = pds.partitioning(pa.schema([("tenant", pa.string())]), flavor="hive")


def read_table(storage: Storage, uri: str, columns: list[str] | None = None, hive: bool = False) -> pa.Table | None:
    """All Parquet files under `uri` (results or rejects; `hive` restores the tenant column from their tenant
    folders) as one table, or None when nothing has been written there yet. For people and tests: the run itself
    never reads results back."""
    if not any(True for _ in storage.list_files(uri, suffixes=[".parquet"])):
        return None
    filesystem, path = storage.arrow_filesystem(uri)
    dataset = pds.dataset(path, filesystem=filesystem, format="parquet",
                          partitioning=TENANT_PARTITIONING if hive else None)
    return dataset.to_table(columns=columns)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def publish(storage: Storage, uri: str, data: bytes) -> None:
    """Put `data` at `uri` unless something is there. A retried PUT whose first response was lost finds its own
    bytes there, which counts as written; anything else at a writer's own name is a conflict."""
    if storage.put_if_absent(uri, data) or storage.read_bytes(uri) == data:
        return
    raise CommitConflict(f"{uri}: another writer's object is at this name")


def publish_once(storage: Storage, uri: str, data: bytes) -> bool:
    """For objects whose content is a function of the inputs (rejects): the first copy stays. True if written."""
    return storage.put_if_absent(uri, data)


def reject_partition(tenant: str | None, known: Collection[str] | None) -> str:
    """The tenant folder a reject goes to: its tenant when that is a name the run knows (any name without a
    registry), else `UNATTRIBUTED`, so a row can never put its raw text into another tenant's folder or invent one."""
    if tenant is None or not is_name(tenant) or (known is not None and tenant not in known):
        return UNATTRIBUTED
    return tenant


def publish_rejects(storage: Storage, layout: OutputLayout, rejects: list[dict], name: str, kind: str | None = None,
                    *, known: Collection[str] | None = None) -> dict[str, int]:
    """Publish rejects (rows of REJECT_SCHEMA) as one part per tenant folder, each kept once (`publish_once`);
    returns how many went to each folder. `known`: the registry's tenants, or None for any name."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for reject in rejects:
        groups[reject_partition(reject["tenant"], known)].append(reject)
    for tenant, group in sorted(groups.items()):
        table = pa.Table.from_pylist(group, schema=REJECT_SCHEMA).drop_columns(["tenant"])
        publish_once(storage, layout.reject_part(tenant, name, kind), parquet_bytes(table))
    return {tenant: len(group) for tenant, group in sorted(groups.items())}


class ChunkCommitter:
    """Buffers one chunk's result rows and commits them in parts per tenant every `flush_rows` rows or
    `flush_seconds` seconds. One committer per attempt at the chunk: its token keeps part names unique."""

    def __init__(self, storage: Storage, layout: OutputLayout, chunk: str, *, flush_rows: int, flush_seconds: float):
        self.storage = storage
        self.layout = layout
        self.chunk = chunk
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.token = uuid.uuid4().hex[:8]
        self.sequence = 0
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def due(self) -> bool:
        return bool(self.rows) and (
            len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds
        )

    def flush(self) -> list[dict]:
        """Commit the buffered rows; returns them (each now committed)."""
        self.last_flush = time.monotonic()
        rows, self.rows = self.rows, []
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[row["tenant"]].append(row)
        for index, (tenant, group) in enumerate(sorted(groups.items())):
            if index:
                failpoint("commit.between_parts")
            table = pa.Table.from_pylist(group, schema=RESULT_SCHEMA).drop_columns(["tenant"])
            uri = self.layout.result_part(tenant, self.chunk, self.token, self.sequence)
            publish(self.storage, uri, parquet_bytes(table))
        self.sequence += 1
        return rows


def write_marker(storage: Storage, layout: OutputLayout, stats: ChunkStats) -> None:
    """The chunk is finished: `failed.json` when some of its rows failed (a re-run retries them), else `done.json`."""
    failed = stats.by_status.get("failed", 0) > 0
    name = DONE_WITH_FAILURES if failed else DONE
    storage.write_bytes(layout.chunk_file(stats.chunk, name), stats.model_dump_json().encode())
    storage.delete(layout.chunk_file(stats.chunk, DONE if failed else DONE_WITH_FAILURES))
