"""Manifest files as a source (JSON lines, CSV, Parquet; local or s3://), a catalog's product files among them.

Planned up front: every manifest is cut into chunks of `chunk_rows` lines, saved with the manifests' versions
(`factory.jobs.sources.manifests.plan`); a re-run reads the plan back and refuses manifests that changed. The
pre-pass validates every chunk once per run and stages its requests as typed Parquet (`validate`), then rejects
repeated (tenant, id) keys in one barrier (`duplicates`). On a worker, a chunk's items are its staged requests
minus its duplicates and what earlier attempts committed, ordered by adapter; an item's call carries its input
images' bytes (a caption's image, every reference of an edit; fetched under its tenant's input roots), or it
takes the image an earlier run made from the same inputs (`reuse`) without a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from factory.errors import InputError, StorageUnavailable
from factory.io.images import fetch_bytes
from factory.jobs.engine.commit import publish_rejects
from factory.jobs.engine.counts import ChunkStats, ChunkValidation
from factory.jobs.engine.model_stage import ReplicaStage
from factory.jobs.engine.resume import MARKER_READERS, chunk_finished, row_identity
from factory.jobs.engine.scores import row_scores
from factory.jobs.sources.manifests.reuse import (
    ReuseContext, content_key, lookup, remember, reuse_context, reused_result,
)
from factory.jobs.engine.source import ChunkInput, Item, Pending, Planned, ReplicaReader, RunContext, Source
from factory.jobs.engine.writers import ImageWriter
from factory.jobs.sources.manifests.benchmarks import stage_benchmarks
from factory.jobs.sources.manifests.duplicates import DedupIndex, find_repeated_ids, load_duplicates, shard_count
from factory.jobs.sources.manifests.files import expand_manifest_uris
from factory.jobs.sources.manifests.plan import Chunk, ChunkPlan, load_or_build_plan
from factory.jobs.sources.manifests.validate import (
    VALIDATED, TenantRoots, ValidateContext, reject_row, staged_requests,
)
from factory.jobs.spec import JobSpec, QualitySpec, generation_defaults
from factory.model.profiles import get_profile
from factory.routing.batch import ReplicaCall, reference_digests
from factory.routing.executor import base_result
from factory.routing.requests import Status, TaskRequest, TaskResult
from factory.routing.tenants import TenantRegistry

log = structlog.get_logger(__name__)

PLAN_REJECTS = "plan"


@dataclass(frozen=True)
class ManifestRow:
    """A staged request on its way through the model stage: its manifest line, and its tenant's input roots."""

    line: int
    request: TaskRequest
    roots: TenantRoots


def ordered_by_adapter(requests: list[tuple[int, TaskRequest]], window: int | None) -> list[tuple[int, TaskRequest]]:
    """Requests for the same adapter next to each other (stable), within windows of `window` rows or the whole
    chunk, so replicas switch adapters far less often than manifest order would make them."""
    def key(item: tuple[int, TaskRequest]) -> str:
        return item[1].adapter or ""

    size = window or max(len(requests), 1)
    return [item for start in range(0, len(requests), size) for item in sorted(requests[start:start + size], key=key)]


class ManifestReader(ReplicaReader):
    """The manifests' side on the workers; see the module docstring."""

    chunk_model = Chunk

    def __init__(self, ctx: ValidateContext, index: DedupIndex, *, allow_http: bool, adapter_window: int | None,
                 reuse: ReuseContext | None, quality: QualitySpec | None = None):
        self.ctx, self.index = ctx, index
        self.allow_http, self.adapter_window, self.reuse = allow_http, adapter_window, reuse
        self.quality = quality
        self.images = ImageWriter(ctx.storage, ctx.layout)

    def where(self, chunk: Chunk) -> str:
        return chunk.source

    def open(self, chunk: Chunk) -> ChunkInput:
        """The chunk's staged requests, less the rows whose id an earlier row of their tenant owns."""
        storage, layout = self.ctx.storage, self.ctx.layout
        validated = ChunkValidation.model_validate_json(storage.read_bytes(layout.chunk_file(chunk.id, VALIDATED)))
        staged = staged_requests(self.ctx, chunk.id)
        duplicates = self.index.duplicates(chunk.id)
        if duplicates:
            lines = pa.array(sorted(load_duplicates(storage, layout, chunk.id, self.index)), pa.int64())
            staged = staged.filter(pc.invert(pc.is_in(staged["line"], value_set=lines)))
        roots = TenantRoots(self.ctx, chunk.source)
        return ChunkInput(tenants=sorted(set(staged["tenant"].to_pylist())), rejects=validated.rejects + duplicates,
                          items=lambda committed: self._items(staged, committed, roots))

    def _items(self, staged: pa.Table, committed: pa.Table, roots: TenantRoots) -> Iterator[Item]:
        if committed.num_rows:
            staged = staged.filter(pc.invert(pc.is_in(row_identity(staged), value_set=row_identity(committed))))
        requests = [(row.pop("line"), TaskRequest.model_validate(row)) for row in staged.to_pylist()]
        for line, request in ordered_by_adapter(requests, self.adapter_window):
            yield Item(row_id=request.id, tenant=request.tenant, adapter=request.adapter,
                       data=ManifestRow(line, request, roots))

    async def calls(self, item: Item) -> list[ReplicaCall] | TaskResult:
        """The call with its input images' bytes (a caption's image, or every reference of an edit); or, without
        a call, an image an earlier run made from the same inputs (an edit's: from references with the same
        bytes), or the row's failure to read an input. The roots were checked at validation; checked again
        here, as links may have changed since."""
        row: ManifestRow = item.data
        request, storage = row.request, self.ctx.storage
        inputs = []
        for field, uri in request.named_inputs:
            try:
                inputs.append(await asyncio.to_thread(fetch_bytes, uri, storage, allow_http=self.allow_http,
                                                      roots=row.roots.of(request.tenant)))
            except InputError as error:
                return base_result(request, None, status=Status.REJECTED, error=f"{field}: {error}")
            except StorageUnavailable as error:  # retried by the store already: fail the row, a re-run retries it
                return base_result(request, None, status=Status.FAILED, error=f"{field}: {error}")
        references = inputs if request.images else None
        if self.reuse is not None:
            digests = reference_digests(references) if references is not None else None
            key = content_key(request, self.reuse, digests)
            found = key and await asyncio.to_thread(lookup, storage, self.reuse, key)
            if found:
                record, image_png = found
                return reused_result(request, record, image_png, self.reuse.profile, digests)
        image_bytes = inputs[0] if request.image is not None else None
        return [ReplicaCall(request=request, image_bytes=image_bytes, reference_bytes=references)]

    async def row(self, chunk: Chunk, item: Item, results: list[TaskResult], attempts: int) -> dict:
        """The result row; its image written first, and remembered for later runs when the model made it."""
        row: ManifestRow = item.data
        request = row.request
        result = await self.images.write(request.tenant, request.id, results[0])
        if attempts and result.status is Status.OK and result.image_uri and self.reuse is not None:
            key = content_key(request, self.reuse, result.reference_sha256)  # the runner hashed what it was sent
            if key is not None:
                await asyncio.to_thread(remember, self.ctx.storage, self.reuse, key, result, self.ctx.run_id)
        out = result.model_dump(mode="json", exclude={"image_png", "quarantine_png"})
        out.update(attempts=attempts, run_id=self.ctx.run_id, manifest=chunk.source, manifest_line=row.line,
                   finished_at=datetime.now(UTC), **row_scores(result, self.quality))
        return out


class ManifestSource(Source):
    """Manifests and a catalog's product files; see the module docstring."""

    prepass = True
    counts = "rows"

    def __init__(self, spec: JobSpec, run: RunContext):
        self.spec, self.run = spec, run
        self.registry = TenantRegistry.from_file(spec.tenants) if spec.tenants else None
        self.plan_: ChunkPlan | None = None
        self.products: frozenset[str] = frozenset()
        self.benchmark_roots: dict[str, tuple[str, ...]] = {}  # a benchmark's staged manifest -> its images
        self.index: DedupIndex | None = None

    @property
    def chunk_plan(self) -> ChunkPlan:
        assert self.plan_ is not None, "plan() first"
        return self.plan_

    def plan(self) -> None:
        storage, spec = self.run.storage, self.spec
        manifests = expand_manifest_uris(spec.inputs or [], storage)
        staged = stage_benchmarks(spec.benchmarks, storage, self.run.layout)
        self.benchmark_roots = {uri: (entry.images,) for uri, entry in zip(staged, spec.benchmarks, strict=True)}
        manifests += staged
        products = expand_manifest_uris(spec.catalog.products, storage) if spec.catalog is not None else []
        self.plan_ = load_or_build_plan(manifests + products, storage, spec.chunk_rows, self.run.layout.plan)
        self.products = frozenset(products)
        if self.plan_.problems:
            rejects = [reject_row(self.run.run_id, problem.source, 0, "manifest", problem.reason)
                       for problem in self.plan_.problems]
            publish_rejects(storage, self.run.layout, rejects, PLAN_REJECTS)  # no tenant: rejects/tenant=_unknown/

    def context(self) -> ValidateContext:
        """What validating a chunk needs (and, with the index, what reading one needs); shipped to Ray workers."""
        ctx = ValidateContext(
            run_id=self.run.run_id, layout=self.run.layout, storage=self.run.storage,
            defaults=generation_defaults(self.spec), profile=get_profile(self.spec.profile), shards=1,
            registry=self.registry, tally=self.run.tally,
            catalog=self.spec.catalog, catalog_sources=self.products,
            input_roots=tuple(self.spec.input_roots),
            # A benchmark's images folder is named by the operator in the spec: its own rows may read there.
            manifest_roots=self.benchmark_roots,
        )
        return replace(ctx, shards=shard_count(sum(ctx.expected_rows(chunk) for chunk in self.chunk_plan.chunks)))

    def prepare(self, states: dict[str, set[str]], progress) -> None:
        self.index = find_repeated_ids(self.context(), self.chunk_plan, states, progress, self.spec.name)

    def pending(self, states: dict[str, set[str]], retry_failed: bool) -> Pending:
        """The unfinished chunks, and the rows they run: their validated requests less their duplicates."""
        chunks = [chunk for chunk in self.chunk_plan.chunks
                  if not chunk_finished(states.get(chunk.id, set()), retry_failed)]
        assert self.index is not None, "prepare() first"
        rows = sum(found.requests for found in self._validated(chunks))
        return Pending(work=[{"chunk": chunk.model_dump_json()} for chunk in chunks],
                       rows=rows - sum(self.index.duplicates(chunk.id) for chunk in chunks))

    @contextmanager
    def stream(self, pending: Pending):
        import ray

        yield ray.data.from_items(pending.work, override_num_blocks=len(pending.work))

    def reader(self) -> ManifestReader:
        assert self.index is not None, "prepare() first"
        reuse = reuse_context(self.spec, self.registry, self.run.storage) if self.spec.reuse else None
        return ManifestReader(self.context(), self.index, allow_http=self.spec.allow_http,
                              adapter_window=self.spec.adapter_window, reuse=reuse, quality=self.spec.quality)

    def stage(self, retry_failed: bool) -> ReplicaStage:
        return ReplicaStage(self.spec, retry_failed=retry_failed, registry=self.registry)

    def planned(self) -> Planned:
        return Planned(chunks=[(chunk.id, chunk.source) for chunk in self.chunk_plan.chunks],
                       rejects=len(self.chunk_plan.problems))

    def input_rows(self, markers: list[ChunkStats]) -> int:
        return self.chunk_plan.total_rows

    def validation(self) -> ChunkValidation:
        """What the pre-pass found in every chunk, repeated ids taken away."""
        assert self.index is not None, "prepare() first"
        total = ChunkValidation(chunk="*")
        for found in self._validated(self.chunk_plan.chunks):
            total.merge(found)
        for removed in self.index.removed.values():
            total.remove(removed)
        return total

    def _validated(self, chunks: list[Chunk] | tuple[Chunk, ...]) -> list[ChunkValidation]:
        """Each chunk's validation counts: its `validated` marker."""
        storage, layout = self.run.storage, self.run.layout

        def read(chunk: Chunk) -> ChunkValidation:
            return ChunkValidation.model_validate_json(storage.read_bytes(layout.chunk_file(chunk.id, VALIDATED)))

        with ThreadPoolExecutor(MARKER_READERS) as pool:
            return list(pool.map(read, chunks))
