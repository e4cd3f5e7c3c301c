"""The Ray Data stages of a run: read manifests, validate rows, call the replicas.

Every stage passes rows as {"kind", "payload"} where payload is JSON text: manifest rows are heterogeneous
(CSV strings, JSON numbers, missing cells), and a fixed two-column schema keeps Arrow from guessing types
per block.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import structlog

from factory.errors import FactoryError, InputError
from factory.jobs.sinks import OutputLayout
from factory.jobs.storage import Storage
from factory.routing.parser import GenerationDefaults, RequestError, parse_request, with_adapter
from factory.routing.requests import Status, TaskRequest, TaskResult

log = structlog.get_logger(__name__)

RECORD, REQUEST, REJECT, RESULT = "record", "request", "reject", "result"
READ_CHUNK_ROWS = 64


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to know about the run; shipped to Ray workers."""

    job: str
    run_id: str
    layout: OutputLayout
    storage: Storage
    defaults: GenerationDefaults
    allow_http: bool
    app_name: str
    in_flight: int
    row_timeout_s: float = 600.0
    registry: Any = None  # a factory.routing.tenants.TenantRegistry, or None: every row runs the base model


def _batch(kinds: list[str], payloads: list[str]) -> dict[str, np.ndarray]:
    return {"kind": np.array(kinds, dtype=object), "payload": np.array(payloads, dtype=object)}


def source_key(manifest: str, line: int) -> str:
    return f"{manifest}#{line}"


def reject_row(ctx: RunContext, manifest: str, line: int, field: str, reason: str,
               raw: Any = None, row_id: str | None = None, tenant: str | None = None) -> str:
    return json.dumps({
        "manifest": manifest, "manifest_line": line, "id": row_id, "tenant": tenant, "field": field,
        "reason": reason, "row": raw if isinstance(raw, str) or raw is None else json.dumps(raw, default=str),
        "run_id": ctx.run_id,
    })


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


def read_manifests(batch: dict[str, np.ndarray], ctx: RunContext) -> Iterator[dict[str, np.ndarray]]:
    """One manifest file per input row, streamed out in chunks so a big file never sits in memory."""
    from factory.jobs.manifests import iter_manifest_records

    for uri in batch["uri"]:
        kinds: list[str] = []
        payloads: list[str] = []
        try:
            for record in iter_manifest_records(str(uri), ctx.storage):
                if record.error is not None:
                    kinds.append(REJECT)
                    payloads.append(reject_row(ctx, record.source, record.line, "row", record.error))
                else:
                    kinds.append(RECORD)
                    payloads.append(json.dumps(
                        {"manifest": record.source, "line": record.line, "raw": record.raw}, default=str
                    ))
                if len(kinds) >= READ_CHUNK_ROWS:
                    yield _batch(kinds, payloads)
                    kinds, payloads = [], []
        except FactoryError as error:
            # An unreadable file is one reject naming it; the rows read before the failure still run.
            kinds.append(REJECT)
            payloads.append(reject_row(ctx, str(uri), 0, "manifest", str(error)))
        if kinds:
            yield _batch(kinds, payloads)


def validate_rows(batch: dict[str, np.ndarray], ctx: RunContext, ledger) -> dict[str, np.ndarray]:
    """Manifest records -> resolved requests or rejects; rows committed by an earlier attempt are dropped."""
    import ray

    from factory.jobs.ledger import COMMITTED, DUPLICATE
    from factory.jobs.manifests import ManifestRecord, validate_record

    out: list[tuple[str, str, str]] = []  # (kind, payload, reject key or "")
    candidates: list[tuple[TaskRequest, str, int, Any]] = []
    for kind, payload in zip(batch["kind"], batch["payload"]):
        if kind == REJECT:
            item = json.loads(payload)
            out.append((REJECT, payload, source_key(item["manifest"], item["manifest_line"])))
            continue
        item = json.loads(payload)
        manifest, line, raw = item["manifest"], item["line"], item["raw"]
        row, reject = validate_record(ManifestRecord(source=manifest, line=line, raw=raw, error=None))
        if reject is not None:
            tenant = raw.get("tenant") if isinstance(raw, dict) and isinstance(raw.get("tenant"), str) else None
            out.append((REJECT, reject_row(ctx, manifest, line, reject.field or "row", reject.reason, reject.raw,
                                           reject.id, tenant), source_key(manifest, line)))
            continue
        try:
            request = with_adapter(parse_request(row, ctx.defaults), ctx.registry)
        except RequestError as error:
            out.append((REJECT, reject_row(ctx, manifest, line, error.field, error.reason, raw, row.id, row.tenant),
                        source_key(manifest, line)))
            continue
        candidates.append((relative_to_manifest(request, manifest), manifest, line, raw))

    verdicts = ray.get(ledger.claim.remote([(r.id, source_key(m, n)) for r, m, n, _ in candidates])) if candidates else []
    for (request, manifest, line, raw), (verdict, owner) in zip(candidates, verdicts):
        if verdict == COMMITTED:
            continue
        if verdict == DUPLICATE:
            out.append((REJECT, reject_row(ctx, manifest, line, "id", f"duplicate id {request.id!r} (first at {owner})",
                                           raw, request.id, request.tenant), source_key(manifest, line)))
            continue
        out.append((REQUEST, json.dumps({"request": request.model_dump(mode="json"), "manifest": manifest,
                                         "line": line}), ""))

    reject_keys = [key for kind, _, key in out if kind == REJECT]
    fresh = iter(ray.get(ledger.new_rejects.remote(reject_keys)) if reject_keys else [])
    kept = [(kind, payload) for kind, payload, _ in out if kind != REJECT or next(fresh)]
    return _batch([k for k, _ in kept], [p for _, p in kept])


def order_by_adapter(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Within one window of rows, put requests for the same adapter next to each other (stable), so the
    replicas' batches share adapters and switch far less often than manifest order would make them."""
    def adapter_of(item: tuple[str, str]) -> str:
        kind, payload = item
        if kind != REQUEST:
            return ""
        return json.loads(payload)["request"].get("adapter") or ""

    rows = sorted(zip(batch["kind"], batch["payload"]), key=adapter_of)
    return _batch([k for k, _ in rows], [p for _, p in rows])


class CallReplicas:
    """Async Ray Data UDF: sends each request to the Serve replicas with a bounded number in flight, writes
    the images of `ok` rows, and returns result rows (without pixels) for the driver to commit."""

    def __init__(self, ctx: RunContext):
        from ray import serve

        from factory.jobs.metrics import JobMetrics
        from factory.logs import configure_logging
        from factory.routing.replica import DEPLOYMENT_NAME

        configure_logging("warning")
        self.ctx = ctx
        self.handle = serve.get_deployment_handle(DEPLOYMENT_NAME, ctx.app_name)
        self.metrics = JobMetrics(ctx.job)
        self._limit: asyncio.Semaphore | None = None
        self.log = log.bind(job=ctx.job, run_id=ctx.run_id)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._limit is None:  # created here: it belongs to the event loop Ray Data runs us on
            self._limit = asyncio.Semaphore(self.ctx.in_flight)
        tasks = [
            self._process(payload) if kind == REQUEST else asyncio.sleep(0, result=(kind, payload))
            for kind, payload in zip(batch["kind"], batch["payload"])
        ]
        done = await asyncio.gather(*tasks)
        return _batch([k for k, _ in done], [p for _, p in done])

    async def _process(self, payload: str) -> tuple[str, str]:
        from factory.routing.replica import ReplicaCall, adapter_key

        item = json.loads(payload)
        request = TaskRequest.model_validate(item["request"])
        row_log = self.log.bind(tenant=request.tenant, row_id=request.id)
        started = time.perf_counter()
        async with self._limit:
            result = await self._run(request, row_log, ReplicaCall, adapter_key)
        try:
            if result.status is Status.OK and result.image_png is not None:
                uri = self.ctx.layout.image(request.tenant, request.id)
                await asyncio.to_thread(self.ctx.storage.write_bytes, uri, result.image_png)
                result.image_uri = uri
            elif result.quarantine_png is not None:
                uri = self.ctx.layout.quarantine(request.tenant, request.id)
                await asyncio.to_thread(self.ctx.storage.write_bytes, uri, result.quarantine_png)
                result.quarantine_uri = uri
        except FactoryError as error:
            result = result.model_copy(update={"status": Status.FAILED, "error": f"writing image: {error}",
                                               "image_uri": None, "quarantine_uri": None})
        self.metrics.record(result, time.perf_counter() - started)
        if result.status is Status.FAILED:
            row_log.warning("row failed", error=result.error)
        row = result.model_dump(mode="json", exclude={"image_png", "quarantine_png"})
        row.update(run_id=self.ctx.run_id, manifest=item["manifest"], manifest_line=item["line"],
                   finished_at=datetime.now(UTC).isoformat())
        return RESULT, json.dumps(row)

    async def _run(self, request: TaskRequest, row_log, ReplicaCall, adapter_key) -> TaskResult:
        from factory.jobs.fetch import fetch_bytes

        image_bytes = None
        if request.image is not None:
            try:
                image_bytes = await asyncio.to_thread(
                    fetch_bytes, request.image, self.ctx.storage, allow_http=self.ctx.allow_http
                )
            except InputError as error:
                return _result(request, Status.REJECTED, f"image: {error}")
        try:
            handle = self.handle.options(multiplexed_model_id=adapter_key(request))
            response = handle.remote(ReplicaCall(request=request, image_bytes=image_bytes))
            return await asyncio.wait_for(response, timeout=self.ctx.row_timeout_s)
        except TimeoutError:
            row_log.warning("replica call timed out", timeout_s=self.ctx.row_timeout_s)
            return _result(request, Status.FAILED, f"timed out after {self.ctx.row_timeout_s:g} s")
        except Exception as error:  # a replica crash or timeout fails this row; the job goes on
            row_log.warning("replica call failed", error=repr(error))
            return _result(request, Status.FAILED, f"replica: {type(error).__name__}: {error}")


def _result(request: TaskRequest, status: Status, error: str) -> TaskResult:
    return TaskResult(
        id=request.id, tenant=request.tenant, task=request.task, status=status, prompt=request.prompt,
        question=request.question, source_uri=request.image, adapter=request.adapter, seed=request.seed,
        steps=request.steps, width=request.width, height=request.height, guidance=request.guidance, error=error,
    )
