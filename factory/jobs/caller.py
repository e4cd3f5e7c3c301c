"""The model stage: a chunk's requests go to the Serve replicas and its results are committed by this worker.

A `ChunkCaller` is a Ray Data actor that takes one chunk per call (a few at once), orders the chunk's requests by
adapter, sends them to the replicas in batches of the replicas' batch size (one Serve request and one library
call per batch, all on one adapter) with at most `in_flight` requests in flight, writes the images of `ok` rows,
commits result parts as rows finish, and writes the chunk's marker at the end. Only counts leave it: to the
run's tally as it goes, and the chunk's counts as its output row. A transient fault (a dead replica, a timeout, a dropped connection) is retried with backoff
before a row is called `failed`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from pydantic import BaseModel

from factory.errors import FactoryError, InputError, StorageUnavailable
from factory.io.images import fetch_bytes
from factory.jobs.reuse import ReuseContext, content_key, lookup, remember, reused_result
from factory.jobs.commit import (
    DONE, DONE_WITH_FAILURES, RESULT_SCHEMA, STARTED, VALIDATED, ChunkCommitter, committed_parts, read_committed,
    stats_of, write_marker,
)
from factory.jobs.dedup import DedupIndex, load_duplicates
from factory.jobs.plan import Chunk
from factory.jobs.spec import RetryConfig
from factory.jobs.summary import ChunkStats, ChunkValidation
from factory.jobs.validate import TenantRoots, ValidateContext, staged_requests
from factory.routing.batch import ReplicaCall, adapter_key
from factory.routing.executor import base_result
from factory.routing.requests import Status, TaskRequest, TaskResult

log = structlog.get_logger(__name__)


class JobStopped(FactoryError):
    """The run's tally says stop (the error budget ran out); committed rows stay committed."""


@dataclass(frozen=True)
class CallContext:
    """What the model stage needs; shipped to Ray workers."""

    job: str
    chunks: ValidateContext
    dedup: DedupIndex
    app_name: str
    in_flight: int
    row_timeout_s: float
    retry: RetryConfig
    allow_http: bool
    batch_size: int  # requests per replica call: the replicas' max_batch_size
    flush_rows: int
    flush_seconds: float
    adapter_window: int | None
    retry_failed: bool
    reuse: ReuseContext | None = None  # set: generation rows whose inputs an earlier run had reuse its image


@dataclass
class ChunkWork:
    requests: list[tuple[int, TaskRequest]]  # (manifest line, request) still to run
    stats: ChunkStats  # what the chunk has committed already, rejects included


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the same call can succeed: the replica died or was replaced, Serve shed load, the call
    timed out or a connection dropped."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    found: list[type[BaseException]] = [TimeoutError, ConnectionError, ray_errors.RayActorError,
                                        ray_errors.RaySystemError, ray_errors.ObjectLostError]
    for name in ("ActorUnavailableError", "GetTimeoutError", "NodeDiedError"):
        if hasattr(ray_errors, name):
            found.append(getattr(ray_errors, name))
    for name in ("BackPressureError", "DeploymentUnavailableError", "RequestCancelledError"):
        if hasattr(serve_errors, name):
            found.append(getattr(serve_errors, name))
    return tuple(found)


def row_identity(table: pa.Table) -> pa.ChunkedArray:
    """`tenant/id` per row: ids are unique per tenant only, so another tenant's committed `p1` is not this one's
    (a tenant is a name: it never holds a '/')."""
    return pc.binary_join_element_wise(table["tenant"], table["id"], "/")


def prepare_chunk(ctx: CallContext, chunk: Chunk) -> ChunkWork:
    """The chunk's staged requests minus duplicates and rows an earlier attempt committed.

    Whether an earlier attempt started the chunk is read from storage here, not taken from the driver's listing:
    Ray Data hands a chunk to another actor when the one working on it dies, within this same attempt."""
    store, layout = ctx.chunks.storage, ctx.chunks.layout
    validated = ChunkValidation.model_validate_json(store.read_bytes(layout.chunk_file(chunk.id, VALIDATED)))
    staged = staged_requests(ctx.chunks, chunk.id)
    duplicates = ctx.dedup.duplicates(chunk.id)
    if duplicates:
        lines = pa.array(sorted(load_duplicates(store, layout, chunk.id, ctx.dedup)), pa.int64())
        staged = staged.filter(pc.invert(pc.is_in(staged["line"], value_set=lines)))
    tenants = sorted(set(staged["tenant"].to_pylist()))
    committed = RESULT_SCHEMA.empty_table()
    if store.exists(layout.chunk_file(chunk.id, STARTED)):
        # Unfinished, or finished with failures to retry: drop the marker first, so a crash from here on leaves
        # the chunk unfinished rather than finished with rows missing.
        for name in (DONE, DONE_WITH_FAILURES):
            store.delete(layout.chunk_file(chunk.id, name))
        committed = read_committed(store, committed_parts(store, layout, chunk.id, tenants),
                                   drop_failed=ctx.retry_failed)
    else:
        store.write_bytes(layout.chunk_file(chunk.id, STARTED), json.dumps({"tenants": tenants}).encode())
    if committed.num_rows:
        staged = staged.filter(pc.invert(pc.is_in(row_identity(staged), value_set=row_identity(committed))))
    requests = [
        (row.pop("line"), TaskRequest.model_validate(row)) for row in staged.to_pylist()
    ]
    return ChunkWork(requests=requests, stats=stats_of(chunk.id, committed, validated.rejects + duplicates))


def ordered_by_adapter(requests: list[tuple[int, TaskRequest]], window: int | None) -> list[tuple[int, TaskRequest]]:
    """Requests for the same adapter next to each other (stable), within windows of `window` rows or the whole
    chunk, so replicas switch adapters far less often than manifest order would make them."""
    def key(item: tuple[int, TaskRequest]) -> str:
        return item[1].adapter or ""

    size = window or max(len(requests), 1)
    return [item for start in range(0, len(requests), size) for item in sorted(requests[start:start + size], key=key)]


class ChunkCaller:
    """Ray Data actor UDF: one chunk per call; see the module docstring."""

    # A caller of another kind of chunk (archives) names its model here and overrides `run_chunk`.
    chunk_model: type[BaseModel] = Chunk

    def __init__(self, ctx: CallContext):
        from ray import serve

        from factory.jobs.metrics import JobMetrics
        from factory.logs import configure_logging
        from factory.routing.replica import DEPLOYMENT_NAME

        configure_logging("warning")
        self.ctx = ctx
        self.handle = serve.get_deployment_handle(DEPLOYMENT_NAME, ctx.app_name)
        self.metrics = JobMetrics(ctx.job)
        self.transient = transient_errors()
        self._limit: asyncio.Semaphore | None = None
        self.log = log.bind(job=ctx.job, run_id=ctx.chunks.run_id)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._limit is None:  # created here: it belongs to the event loop Ray Data runs us on
            self._limit = asyncio.Semaphore(max(1, -(-self.ctx.in_flight // self.ctx.batch_size)))
        out = []
        for text in batch["chunk"]:
            stats = await self.run_chunk(self.chunk_model.model_validate_json(text))
            out.append(stats.model_dump_json())
        return {"stats": np.array(out, dtype=object)}

    async def run_chunk(self, chunk: Chunk) -> ChunkStats:
        chunk_log = self.log.bind(chunk=chunk.id, manifest=chunk.source)
        work = await asyncio.to_thread(prepare_chunk, self.ctx, chunk)
        stats = work.stats
        await self._report({"settled": self.ctx.chunks.expected_rows(chunk) - len(work.requests)})
        committer = ChunkCommitter(self.ctx.chunks.storage, self.ctx.chunks.layout, chunk.id,
                                   flush_rows=self.ctx.flush_rows, flush_seconds=self.ctx.flush_seconds)
        ordered = ordered_by_adapter(work.requests, self.ctx.adapter_window)
        pending = [asyncio.ensure_future(self._batch(chunk, batch, chunk_log))
                   for batch in batches_by_adapter(ordered, self.ctx.batch_size)]
        try:
            for finished in asyncio.as_completed(pending):
                for row in await finished:
                    committer.add(row)
                if committer.due():
                    await self._flush(committer, stats)
            await self._flush(committer, stats)
        finally:
            for task in pending:
                task.cancel()
        await asyncio.to_thread(write_marker, self.ctx.chunks.storage, self.ctx.chunks.layout, stats)
        await self._report({"chunks": 1})
        chunk_log.info("chunk committed", rows=stats.rows, **stats.by_status)
        return stats

    async def _flush(self, committer: ChunkCommitter, stats: ChunkStats) -> None:
        if not committer.rows:
            return
        rows = await asyncio.to_thread(committer.flush)
        stats.add_results(rows)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        stop = await self._report(counts)
        if stop:
            raise JobStopped(stop)

    async def _report(self, counts: dict[str, int]) -> str | None:
        tally = self.ctx.chunks.tally
        return None if tally is None else await tally.add.remote(counts)

    async def _batch(self, chunk: Chunk, batch: list[tuple[int, TaskRequest]], chunk_log) -> list[dict]:
        """One replica call for a batch of requests that share an adapter; one committed-to-be row per request."""
        started = time.perf_counter()
        assert self._limit is not None
        roots = TenantRoots(self.ctx.chunks, chunk.source)
        async with self._limit:
            inputs = await asyncio.gather(*(self._input(request, roots) for _, request in batch))
            results: list[TaskResult | None] = [early for _, early in inputs]
            calls = [call for call, early in inputs if early is None]
            answered, attempts = await self._call(calls, chunk_log) if calls else ([], 0)
        if calls:
            await self._report({"model_rows": len(calls)})
        answers = iter(answered)
        rows = []
        for (line, request), early in zip(batch, results, strict=True):
            result = early if early is not None else next(answers)
            result = await self._write_image(request, result)
            if early is None and result.status is Status.OK and result.image_uri and self.ctx.reuse is not None:
                key = content_key(request, self.ctx.reuse)
                if key is not None:
                    await asyncio.to_thread(remember, self.ctx.chunks.storage, self.ctx.reuse, key, result,
                                            self.ctx.chunks.run_id)
            self.metrics.record(result, time.perf_counter() - started)
            if result.status is Status.FAILED:
                chunk_log.info("row failed", tenant=request.tenant, row_id=request.id, error=result.error)
            row = result.model_dump(mode="json", exclude={"image_png", "quarantine_png"})
            row.update(attempts=0 if early is not None else attempts, run_id=self.ctx.chunks.run_id,
                       manifest=chunk.source, manifest_line=line, finished_at=datetime.now(UTC))
            rows.append(row)
        return rows

    async def _input(self, request: TaskRequest, roots: TenantRoots) -> tuple[ReplicaCall | None, TaskResult | None]:
        """The call to send for a request, with its input image's bytes; or the result it gets without one (an
        unreadable input or one outside its tenant's roots, or an image an earlier run made from the same
        inputs). The roots were checked at validation; checked again here, as links may have changed since."""
        if self.ctx.reuse is not None:
            key = content_key(request, self.ctx.reuse)
            found = key and await asyncio.to_thread(lookup, self.ctx.chunks.storage, self.ctx.reuse, key)
            if found:
                record, image_png = found
                return None, reused_result(request, record, image_png, self.ctx.reuse.profile)
        image_bytes = None
        if request.image is not None:
            try:
                image_bytes = await asyncio.to_thread(
                    fetch_bytes, request.image, self.ctx.chunks.storage, allow_http=self.ctx.allow_http,
                    roots=roots.of(request.tenant),
                )
            except InputError as error:
                return None, base_result(request, None, status=Status.REJECTED, error=f"image: {error}")
            except StorageUnavailable as error:  # retried by the store already: fail the row, a re-run retries it
                return None, base_result(request, None, status=Status.FAILED, error=f"image: {error}")
        return ReplicaCall(request=request, image_bytes=image_bytes), None

    async def _call(self, calls: list[ReplicaCall], chunk_log) -> tuple[list[TaskResult], int]:
        """The replicas' results for one batch, retrying transient faults with backoff; (results, attempts)."""
        handle = self.handle.options(multiplexed_model_id=adapter_key(calls[0].request))
        retry = self.ctx.retry
        for attempt in range(1, retry.attempts + 1):
            response = handle.run_many.remote(calls)
            try:
                return await asyncio.wait_for(response, timeout=self.ctx.row_timeout_s), attempt
            except self.transient as error:
                response.cancel()
                reason = (f"timed out after {self.ctx.row_timeout_s:g} s" if isinstance(error, TimeoutError)
                          else f"replica: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                if attempt == retry.attempts:
                    reason = f"{reason} (after {attempt} attempts)"
                    failed = [base_result(call.request, None, status=Status.FAILED, error=reason) for call in calls]
                    return failed, attempt
                delay = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                chunk_log.info("replica call failed, retrying", reason=reason, attempt=attempt, rows=len(calls),
                               delay_s=round(delay, 2))
                await asyncio.sleep(delay)
            except Exception as error:  # not transient: the same call would fail again
                chunk_log.info("replica call failed", error=repr(error), rows=len(calls))
                reason = f"replica: {type(error).__name__}: {error}"
                return [base_result(call.request, None, status=Status.FAILED, error=reason) for call in calls], attempt
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write_image(self, request: TaskRequest, result: TaskResult) -> TaskResult:
        """Write an ok row's image (or a quarantined one) before the row that points at it is committed."""
        storage, layout = self.ctx.chunks.storage, self.ctx.chunks.layout
        try:
            if result.status is Status.OK and result.image_png is not None:
                uri = layout.image(request.tenant, request.id)
                await asyncio.to_thread(storage.write_bytes, uri, result.image_png)
                result.image_uri = uri
            elif result.quarantine_png is not None:
                uri = layout.quarantine(request.tenant, request.id)
                await asyncio.to_thread(storage.write_bytes, uri, result.quarantine_png)
                result.quarantine_uri = uri
        except FactoryError as error:
            result = result.model_copy(update={"status": Status.FAILED, "error": f"writing image: {error}",
                                               "image_uri": None, "quarantine_uri": None})
        return result


def batches_by_adapter(requests: list[tuple[int, TaskRequest]], size: int) -> list[list[tuple[int, TaskRequest]]]:
    """Consecutive requests cut into batches of at most `size` that share one adapter (a replica call runs one)."""
    batches: list[list[tuple[int, TaskRequest]]] = []
    for item in requests:
        if batches and len(batches[-1]) < size and batches[-1][0][1].adapter == item[1].adapter:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches
