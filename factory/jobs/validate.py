"""The validate stage: a chunk's manifest rows become typed requests or rejects, once per run.

A worker reads exactly its chunk's rows, validates each, resolves its task and adapter, checks that its image lies
under its tenant's input roots (`TenantRoots`), and writes three things under the run's output: the chunk's
rejects (one part per tenant folder, whose content is a function of the inputs, so a repeat attempt keeps the
first copy), the accepted requests as typed Arrow columns (what the model stage runs), and a `validated` marker
with the chunk's counts. It returns the keys (tenant, id, chunk, line) that duplicate detection needs; the keys
of a chunk an earlier attempt validated come from its staged requests (`staged_keys`), without reading the
manifest again.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from factory.errors import InputError
from factory.io.layout import OutputLayout
from factory.io.roots import InputRoots, folder_of
from factory.io.storage import Storage
from factory.jobs.catalog import CatalogSpec, ExpansionError, Size, checks_of, expand_product
from factory.jobs.commit import (
    READING, REQUEST_SCHEMA, STAGED_REQUESTS, VALIDATED, parquet_bytes, publish_rejects, read_parquet_bytes,
)
from factory.jobs.dedup import KEY_SCHEMA, DedupIndex, key_table, load_duplicates
from factory.jobs.faults import failpoint
from factory.jobs.manifests import ManifestRecord, iter_range_records, validate_record
from factory.jobs.plan import Chunk
from factory.jobs.summary import ChunkValidation
from factory.routing.parser import GenerationDefaults, RequestError, parse_request, with_adapter
from factory.routing.requests import TaskRequest

log = structlog.get_logger(__name__)

ROWS_REJECTS = "rows"
DUPLICATE_REJECTS = "duplicates"


@dataclass(frozen=True)
class ValidateContext:
    """What the validate stage needs; shipped to Ray workers."""

    run_id: str
    layout: OutputLayout
    storage: Storage
    defaults: GenerationDefaults
    shards: int
    registry: Any = None  # a TenantRegistry, or None: every row runs the base model
    tally: Any = None  # the run's RunTally actor, or None
    catalog: CatalogSpec | None = None  # product files among the chunks' sources expand through it
    catalog_sources: frozenset[str] = frozenset()
    input_roots: tuple[str, ...] = ()  # the job's own input roots (normalised), added to every tenant's

    @property
    def known_tenants(self) -> list[str] | None:
        """The tenants a reject may be filed under; None: any name (no registry)."""
        return self.registry.tenants if self.registry is not None else None

    def expected_rows(self, chunk: Chunk) -> int:
        """The rows a chunk becomes: its lines, or for a catalog chunk the most rows its products expand into
        (progress counts to this; the rows a product does not expand into are settled with it)."""
        if self.catalog is not None and chunk.source in self.catalog_sources:
            return chunk.rows * self.catalog.rows_per_product()
        return chunk.rows


class TenantRoots:
    """Where each tenant's images may be, for the rows of one manifest: the tenant's `inputs` from the registry
    plus the job's `input_roots`; a tenant with neither reads only under this manifest's own folder (for a catalog,
    the product file's). Built once per tenant; the same rule at validation and again at the fetch."""

    def __init__(self, ctx: ValidateContext, manifest: str) -> None:
        self.ctx, self.manifest = ctx, manifest
        self._roots: dict[str, InputRoots] = {}

    def of(self, tenant: str) -> InputRoots:
        roots = self._roots.get(tenant)
        if roots is None:
            own = self.ctx.registry.input_roots(tenant) if self.ctx.registry is not None else ()
            allowed = (*own, *self.ctx.input_roots) or (folder_of(self.manifest),)
            roots = self._roots[tenant] = InputRoots(f"tenant {tenant}", tuple(dict.fromkeys(allowed)))
        return roots


def relative_to_manifest(request: TaskRequest, manifest: str) -> TaskRequest:
    """An image path without a scheme is relative to its manifest's folder (local or s3://)."""
    image = request.image
    if image is None or "://" in image or os.path.isabs(image):
        return request
    if manifest.startswith("s3://"):
        bucket, _, key = manifest[len("s3://"):].partition("/")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(key), image))
        image = f"s3://{bucket}/{resolved.lstrip('/')}"
    else:
        image = os.path.normpath(os.path.join(os.path.dirname(manifest), image))
    return request.model_copy(update={"image": image})


def reject_row(run_id: str, manifest: str, line: int, field: str, reason: str, raw: Any = None,
               row_id: str | None = None, tenant: str | None = None) -> dict:
    return {
        "manifest": manifest, "manifest_line": line, "id": row_id, "tenant": tenant, "field": field,
        "reason": reason, "row": raw if isinstance(raw, str) or raw is None else json.dumps(raw, default=str),
        "run_id": run_id,
    }


def count_requests(chunk: str, requests: pa.Table) -> ChunkValidation:
    """A chunk's requests counted by tenant, task and adapter, and the steps x megapixels of its generation rows,
    from their columns."""
    def counts(column: pa.ChunkedArray) -> dict[str, int]:
        found = pc.value_counts(column).to_pylist()
        return {item["values"] if item["values"] is not None else "base": item["counts"] for item in found}

    generate = requests.filter(pc.equal(requests["task"], "generate"))
    pixels = pc.multiply(pc.multiply(generate["steps"], generate["width"]), generate["height"])
    return ChunkValidation(
        chunk=chunk, requests=requests.num_rows, tenants=counts(requests["tenant"]), tasks=counts(requests["task"]),
        adapters=counts(requests["adapter"]),
        generate_step_megapixels=(pc.sum(pixels).as_py() or 0) / 1e6 if generate.num_rows else 0.0,
    )


def validate_chunk(ctx: ValidateContext, chunk: Chunk) -> tuple[ChunkValidation, pa.Table]:
    """Read, validate and stage one chunk; returns its counts (also written as its marker) and its requests.

    A `reading` trace is left first, so that a later attempt can tell (and report) rows it reads a second time."""
    trace = ctx.layout.chunk_file(chunk.id, READING)
    read_before = ctx.storage.exists(trace)
    if not read_before:
        ctx.storage.write_bytes(trace, b"")
    requests: list[dict] = []
    rejects: list[dict] = []
    rows_read = 0
    roots = TenantRoots(ctx, chunk.source)
    try:
        expand = ctx.catalog is not None and chunk.source in ctx.catalog_sources
        for record in iter_range_records(chunk.source, ctx.storage, chunk.first_line, chunk.last_line,
                                         start=chunk.start, end=chunk.end, columns=chunk.columns):
            rows_read += 1
            for request, reject in (_expand_one(ctx, record, roots) if expand else
                                    [_validate_one(ctx, record, roots)]):
                if reject is not None:
                    rejects.append(reject)
                else:
                    requests.append({"line": record.line, **request.model_dump(mode="json")})
    except InputError as error:
        # The bytes of this chunk cannot be decoded (a broken gzip member, a corrupt Parquet page): the rows
        # read so far stand, the rest of the chunk is one reject naming the file and where it broke.
        rejects.append(reject_row(ctx.run_id, chunk.source, chunk.first_line + rows_read, "manifest", str(error)))
    by_tenant = publish_rejects(ctx.storage, ctx.layout, rejects, chunk.id, ROWS_REJECTS, known=ctx.known_tenants)
    staged = pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA)
    stats = count_requests(chunk.id, staged)
    stats.rows_read, stats.read_before, stats.rejects = rows_read, read_before, len(rejects)
    stats.reject_tenants = by_tenant
    stats.reject_fields = dict(Counter(reject["field"] for reject in rejects))
    ctx.storage.write_bytes(ctx.layout.chunk_file(chunk.id, STAGED_REQUESTS), parquet_bytes(staged))
    failpoint("validate.before_marker", chunk.ordinal)
    ctx.storage.write_bytes(ctx.layout.chunk_file(chunk.id, VALIDATED), stats.model_dump_json().encode())
    return stats, staged


def _validate_one(ctx: ValidateContext, record: ManifestRecord,
                  roots: TenantRoots) -> tuple[TaskRequest | None, dict | None]:
    raw = record.raw
    row, reject = validate_record(record)
    if reject is not None:
        tenant = raw.get("tenant") if isinstance(raw, dict) and isinstance(raw.get("tenant"), str) else None
        return None, reject_row(ctx.run_id, record.source, record.line, reject.field or "row", reject.reason,
                                reject.raw, reject.id, tenant)
    try:
        request = with_adapter(parse_request(row, ctx.defaults), ctx.registry)
    except RequestError as error:
        return None, reject_row(ctx.run_id, record.source, record.line, error.field, error.reason, raw, row.id,
                                row.tenant)
    request = relative_to_manifest(request, record.source)
    if request.image is not None:
        try:  # here, so `factory validate` reports it too; the fetch checks again (links can change meanwhile)
            roots.of(request.tenant).check(request.image)
        except InputError as error:
            return None, reject_row(ctx.run_id, record.source, record.line, "image", str(error), raw, row.id,
                                    row.tenant)
    return request, None


def _expand_one(ctx: ValidateContext, record: ManifestRecord,
                roots: TenantRoots) -> list[tuple[TaskRequest | None, dict | None]]:
    """A catalog product: its generation rows, each validated like a manifest row; or one reject naming why."""
    assert ctx.catalog is not None
    raw = record.raw
    if record.error is not None or not isinstance(raw, dict):
        return [(None, reject_row(ctx.run_id, record.source, record.line, "row", record.error or "no row"))]
    product = {key: value for key, value in raw.items() if not (isinstance(key, str) and key.startswith("_"))}
    size = Size(width=ctx.defaults.width, height=ctx.defaults.height)
    try:
        rows = expand_product(product, ctx.catalog, size)
    except ExpansionError as error:
        tenant = raw.get("tenant") if isinstance(raw.get("tenant"), str) else None
        sku = raw.get("sku")
        return [(None, reject_row(ctx.run_id, record.source, record.line, error.field, error.reason, raw,
                                  str(sku) if sku is not None else None, tenant))]
    checks = checks_of(ctx.catalog)
    out: list[tuple[TaskRequest | None, dict | None]] = []
    for row in rows:
        request, reject = _validate_one(ctx, ManifestRecord(record.source, record.line, row), roots)
        if request is not None and checks:
            request = request.model_copy(update={"checks": tuple(checks)})
        out.append((request, reject))
    return out


def staged_requests(ctx: ValidateContext, chunk: str) -> pa.Table:
    """The typed requests a chunk's validation staged."""
    return read_parquet_bytes(ctx.storage.read_bytes(ctx.layout.chunk_file(chunk, STAGED_REQUESTS)))


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
    return count_requests(chunk.id, repeated)


def duplicate_rejects(batch: dict[str, np.ndarray], ctx: ValidateContext, index: DedupIndex) -> dict[str, np.ndarray]:
    """Ray Data UDF over the chunks that have duplicates: their rejects, and what they take away from the counts."""
    removed = [write_duplicate_rejects(ctx, Chunk.model_validate_json(text), index) for text in batch["chunk"]]
    return {"removed": np.array([item.model_dump_json() for item in removed], dtype=object)}
