"""Where a run's output lands, and the writers that commit it.

Layout under OUTPUT (a local folder or s3:// prefix, one per run):
    images/<tenant>/<id>.png            generated images of `ok` rows (safety verdict pass), before their row
    quarantine/<tenant>/<id>.png        flagged images under a `quarantine` policy; no image_uri points here
    results/tenant=<t>/part-*.parquet   one row per accepted manifest row (Hive-partitioned by tenant)
    rejects/part-*.parquet              rows that failed validation or were duplicates
    summary.json, _SUCCESS              written once the run has finished

A row is committed when its result row is in a results file. Every file is written whole in one atomic step
(a rename locally, one PUT on S3), so a file is either there with all its rows or not there at all.
"""

from __future__ import annotations

import io
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import quote

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import structlog

from factory.jobs.storage import Storage, join

log = structlog.get_logger(__name__)

RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("tenant", pa.string()), ("task", pa.string()), ("status", pa.string()),
    ("prompt", pa.string()), ("question", pa.string()), ("caption", pa.string()), ("answer", pa.string()),
    ("image_uri", pa.string()), ("source_uri", pa.string()), ("adapter", pa.string()),
    ("adapter_sha256", pa.string()), ("profile", pa.string()), ("model_version", pa.string()),
    ("seed", pa.int64()), ("steps", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("guidance", pa.float64()), ("latency_ms", pa.float64()), ("safety_ms", pa.float64()),
    ("error", pa.string()),
    ("safety_verdict", pa.string()), ("safety_decided_by", pa.string()), ("safety_labels", pa.list_(pa.string())),
    ("safety_scores", pa.list_(pa.float64())), ("safety_reason", pa.string()), ("quarantine_uri", pa.string()),
    ("run_id", pa.string()), ("manifest", pa.string()), ("manifest_line", pa.int64()),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
])

REJECT_SCHEMA = pa.schema([
    ("manifest", pa.string()), ("manifest_line", pa.int64()), ("id", pa.string()), ("tenant", pa.string()),
    ("field", pa.string()), ("reason", pa.string()), ("row", pa.string()), ("run_id", pa.string()),
])

TENANT_PARTITIONING = pds.partitioning(pa.schema([("tenant", pa.string())]), flavor="hive")


def object_name(row_id: str) -> str:
    """A row id as one safe path segment: ids like 'sku/12' or '..' must not become paths."""
    name = quote(row_id, safe="-_.")
    return name.replace(".", "%2E") if set(name) == {"."} else name


@dataclass(frozen=True)
class OutputLayout:
    root: str

    def image(self, tenant: str, row_id: str) -> str:
        return join(self.root, "images", tenant, f"{object_name(row_id)}.png")

    def quarantine(self, tenant: str, row_id: str) -> str:
        return join(self.root, "quarantine", tenant, f"{object_name(row_id)}.png")

    @property
    def results(self) -> str:
        return join(self.root, "results")

    @property
    def rejects(self) -> str:
        return join(self.root, "rejects")

    @property
    def summary(self) -> str:
        return join(self.root, "summary.json")

    @property
    def success(self) -> str:
        return join(self.root, "_SUCCESS")


def read_table(storage: Storage, uri: str, columns: list[str] | None = None, hive: bool = False) -> pa.Table | None:
    """All Parquet files under `uri` as one table, or None when nothing has been written there yet."""
    if not any(True for _ in storage.list_files(uri, suffixes=[".parquet"])):
        return None
    filesystem, path = storage.arrow_filesystem(uri)
    dataset = pds.dataset(
        path, filesystem=filesystem, format="parquet",
        partitioning=TENANT_PARTITIONING if hive else None,
    )
    return dataset.to_table(columns=columns)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


class PartWriter:
    """Buffers rows on the driver and commits them in whole Parquet files every `flush_rows` or seconds."""

    def __init__(self, storage: Storage, directory: str, schema: pa.Schema, run_id: str,
                 partition_by: str | None = None, flush_rows: int = 256, flush_seconds: float = 5.0):
        self.storage = storage
        self.directory = directory
        self.schema = schema
        self.run_id = run_id
        self.partition_by = partition_by
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()
        self.committed = 0
        # A per-writer token keeps part names unique across attempts of the same run.
        self.token = uuid.uuid4().hex[:12]
        self.sequence = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        groups: dict[str | None, list[dict]] = defaultdict(list)
        for row in self.rows:
            groups[row[self.partition_by] if self.partition_by else None].append(row)
        for key, rows in groups.items():
            table = pa.Table.from_pylist(rows, schema=self.schema)
            if self.partition_by:
                table = table.drop_columns([self.partition_by])
            folder = join(self.directory, f"{self.partition_by}={key}") if self.partition_by else self.directory
            name = f"part-{self.run_id}-{self.token}-{self.sequence:05d}.parquet"
            self.sequence += 1
            self.storage.write_bytes(join(folder, name), _parquet_bytes(table))
            self.committed += len(rows)
        self.rows = []
