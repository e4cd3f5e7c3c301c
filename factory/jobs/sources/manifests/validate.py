"""The manifests' pre-pass: a chunk's rows become typed requests or rejects, once per run, before the model stage.

A worker reads exactly its chunk's rows (a catalog's product rows through its expansion first), validates each,
resolves its task and adapter, checks that the job's profile can run it (`check_capabilities`) and that each of its
images (an edit's references: every one) lies under its tenant's input roots (`TenantRoots`), and
writes three things under the run's output: the chunk's rejects (one part per tenant folder, whose content is a
function of the inputs, so a repeat attempt keeps the first copy), the accepted requests as typed Arrow columns
(what the model stage runs), and a `validated` marker with the chunk's counts. Repeated ids are found afterwards,
over every chunk's staged requests at once (`factory.jobs.sources.manifests.duplicates`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from factory.errors import InputError
from factory.io.layout import OutputLayout
from factory.io.roots import InputRoots, folder_of
from factory.io.storage import Storage
from factory.jobs.engine.commit import parquet_bytes, publish_rejects, read_parquet_bytes
from factory.jobs.engine.counts import ChunkValidation
from factory.jobs.engine.faults import failpoint
from factory.jobs.sources.manifests.catalog import CatalogExpansion, ExpansionError
from factory.jobs.sources.manifests.files import ManifestRecord, iter_range_records, validate_record
from factory.jobs.sources.manifests.plan import Chunk
from factory.jobs.spec import CatalogSpec, Size
from factory.model.profiles import GeneratorProfile, Profile
from factory.routing.capabilities import check_capabilities
from factory.routing.parser import GenerationDefaults, RequestError, parse_request, with_adapter
from factory.routing.requests import TaskRequest

log = structlog.get_logger(__name__)

ROWS_REJECTS = "rows"
VALIDATED = "validated.json"  # a chunk's marker once validated: its counts
READING = "reading"  # left by the first attempt to read a chunk's rows
STAGED_REQUESTS = "requests.parquet"

REQUEST_SCHEMA = pa.schema([
    ("line", pa.int64()), ("id", pa.string()), ("tenant", pa.string()), ("task", pa.string()),
    ("prompt", pa.string()), ("question", pa.string()), ("image", pa.string()), ("region", pa.string()),
    ("adapter", pa.string()), ("seed", pa.int64()), ("steps", pa.int64()), ("width", pa.int64()),
    ("height", pa.int64()), ("guidance", pa.float64()),
    ("checks", pa.list_(pa.struct([("name", pa.string()), ("question", pa.string())]))),
    ("images", pa.list_(pa.string())),  # an edit's references, in order (TaskRequest reads the list as its tuple)
    # What a caption or VQA row is scored against, carried to its result (factory.jobs.engine.scores).
    ("references", pa.list_(pa.string())), ("answers", pa.list_(pa.string())),
])


@dataclass(frozen=True)
class ValidateContext:
    """What the validate stage needs; shipped to Ray workers."""

    run_id: str
    layout: OutputLayout
    storage: Storage
    defaults: GenerationDefaults
    profile: Profile  # what the job's replicas load: the tasks and references it can run, and its edit cost
    shards: int
    registry: Any = None  # a TenantRegistry, or None: every row runs the base model
    tally: Any = None  # the run's RunTally actor, or None
    catalog: CatalogSpec | None = None  # product files among the chunks' sources expand through it
    catalog_sources: frozenset[str] = frozenset()
    input_roots: tuple[str, ...] = ()  # the job's own input roots (normalised), added to every tenant's
    # Roots for the rows of one manifest only: a `benchmarks:` entry's staged manifest -> its images folder.
    manifest_roots: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def known_tenants(self) -> list[str] | None:
        """The tenants a reject may be filed under; None: any name (no registry)."""
        return self.registry.tenants if self.registry is not None else None

    def expected_rows(self, chunk: Chunk) -> int:
        """The most rows a chunk becomes: its lines, or for a catalog chunk the most rows its products expand into
        (what the duplicate finder's shards are sized by)."""
        if self.catalog is not None and chunk.source in self.catalog_sources:
            return chunk.rows * self.catalog.rows_per_product()
        return chunk.rows

    def expansion(self, chunk: Chunk) -> CatalogExpansion | None:
        """The transform a chunk's records go through before validation: the catalog's, for its product files."""
        if self.catalog is None or chunk.source not in self.catalog_sources:
            return None
        return CatalogExpansion(self.catalog, Size(width=self.defaults.width, height=self.defaults.height))


class TenantRoots:
    """Where each tenant's images may be, for the rows of one manifest: the tenant's `inputs` from the registry
    plus the job's `input_roots` (plus, for a benchmark's staged manifest, its images folder); a tenant with none
    reads only under this manifest's own folder (for a catalog, the product file's). Built once per tenant; the
    same rule at validation and again at the fetch."""

    def __init__(self, ctx: ValidateContext, manifest: str) -> None:
        self.ctx, self.manifest = ctx, manifest
        self._roots: dict[str, InputRoots] = {}

    def of(self, tenant: str) -> InputRoots:
        roots = self._roots.get(tenant)
        if roots is None:
            own = self.ctx.registry.input_roots(tenant) if self.ctx.registry is not None else ()
            allowed = (*own, *self.ctx.input_roots, *self.ctx.manifest_roots.get(self.manifest, ())) or (
                folder_of(self.manifest),)
            roots = self._roots[tenant] = InputRoots(f"tenant {tenant}", tuple(dict.fromkeys(allowed)))
        return roots


def relative_to_manifest(request: TaskRequest, manifest: str) -> TaskRequest:
    """Image paths without a scheme (an edit's references too) are relative to their manifest's folder (local or
    s3://)."""
    if request.images is not None:
        images = tuple(_resolved(uri, manifest) for uri in request.images)
        return request if images == request.images else request.model_copy(update={"images": images})
    if request.image is None:
        return request
    image = _resolved(request.image, manifest)
    return request if image == request.image else request.model_copy(update={"image": image})


def _resolved(image: str, manifest: str) -> str:
    if "://" in image or os.path.isabs(image):
        return image
    if manifest.startswith("s3://"):
        bucket, _, key = manifest[len("s3://"):].partition("/")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(key), image))
        return f"s3://{bucket}/{resolved.lstrip('/')}"
    return os.path.normpath(os.path.join(os.path.dirname(manifest), image))


def reject_row(run_id: str, manifest: str, line: int, field: str, reason: str, raw: Any = None,
               row_id: str | None = None, tenant: str | None = None) -> dict:
    return {
        "manifest": manifest, "manifest_line": line, "id": row_id, "tenant": tenant, "field": field,
        "reason": reason, "row": raw if isinstance(raw, str) or raw is None else json.dumps(raw, default=str),
        "run_id": run_id,
    }


def count_requests(chunk: str, requests: pa.Table, generator: GeneratorProfile) -> ChunkValidation:
    """A chunk's requests counted by tenant, task and adapter, the steps x megapixels of its generation rows, and
    of its edit rows (their references' pixels included, `generator.edit_pixels`) with their references, from
    their columns."""
    def counts(column: pa.ChunkedArray) -> dict[str, int]:
        found = pc.value_counts(column).to_pylist()
        return {item["values"] if item["values"] is not None else "base": item["counts"] for item in found}

    generate = requests.filter(pc.equal(requests["task"], "generate"))
    pixels = pc.multiply(pc.multiply(generate["steps"], generate["width"]), generate["height"])
    edits = requests.filter(pc.equal(requests["task"], "edit"))
    edit_pixels = sum(  # one call per edit row: cheap next to parsing the row
        steps * generator.edit_pixels(len(images), width, height)
        for steps, images, width, height in zip(*(edits[name].to_pylist() for name in
                                                  ("steps", "images", "width", "height")), strict=True)
    )
    return ChunkValidation(
        chunk=chunk, requests=requests.num_rows, tenants=counts(requests["tenant"]), tasks=counts(requests["task"]),
        adapters=counts(requests["adapter"]),
        generate_step_megapixels=(pc.sum(pixels).as_py() or 0) / 1e6 if generate.num_rows else 0.0,
        edit_step_megapixels=edit_pixels / 1e6,
        references=(pc.sum(pc.list_value_length(edits["images"])).as_py() or 0) if edits.num_rows else 0,
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
    expansion = ctx.expansion(chunk)
    try:
        for record in iter_range_records(chunk.source, ctx.storage, chunk.first_line, chunk.last_line,
                                         start=chunk.start, end=chunk.end, columns=chunk.columns):
            rows_read += 1
            for request, reject in (_expand_one(ctx, record, roots, expansion) if expansion is not None else
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
    stats = count_requests(chunk.id, staged, ctx.profile.generator)
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
        check_capabilities(request, ctx.profile)  # an edit its profile cannot run: found before any GPU is booked
    except RequestError as error:
        return None, reject_row(ctx.run_id, record.source, record.line, error.field, error.reason, raw, row.id,
                                row.tenant)
    request = relative_to_manifest(request, record.source)
    for field, uri in request.named_inputs:
        try:  # here, so `factory validate` reports it too; the fetch checks again (links can change meanwhile)
            roots.of(request.tenant).check(uri)
        except InputError as error:
            return None, reject_row(ctx.run_id, record.source, record.line, field, str(error), raw, row.id,
                                    row.tenant)
    return request, None


def _expand_one(ctx: ValidateContext, record: ManifestRecord, roots: TenantRoots,
                expansion: CatalogExpansion) -> list[tuple[TaskRequest | None, dict | None]]:
    """A catalog product: its rows, each validated like a manifest row; or one reject naming why."""
    raw = record.raw
    if record.error is not None or not isinstance(raw, dict):
        return [(None, reject_row(ctx.run_id, record.source, record.line, "row", record.error or "no row"))]
    try:
        records = expansion.records(record)
    except ExpansionError as error:
        tenant = raw.get("tenant") if isinstance(raw.get("tenant"), str) else None
        sku = raw.get("sku")
        return [(None, reject_row(ctx.run_id, record.source, record.line, error.field, error.reason, raw,
                                  str(sku) if sku is not None else None, tenant))]
    out: list[tuple[TaskRequest | None, dict | None]] = []
    for row in records:
        request, reject = _validate_one(ctx, row, roots)
        out.append((expansion.finish(request) if request is not None else None, reject))
    return out


def staged_requests(ctx: ValidateContext, chunk: str) -> pa.Table:
    """The typed requests a chunk's validation staged."""
    return read_parquet_bytes(ctx.storage.read_bytes(ctx.layout.chunk_file(chunk, STAGED_REQUESTS)))
