"""Captioning image archives (`factory caption`, or a job spec with an `archive:` section).

An archive is a source of chunks like a manifest is, and its chunks take the same road: Ray Data workers ->
the job's Serve replicas -> result parts committed by the worker -> a marker per chunk.

**Chunks.** A folder, an s3:// prefix or a zip is cut into chunks of `chunk_objects` objects as it is listed
(names in a stable sorted order; a zip's members in central-directory order); a tar shard is one chunk (a tar can
only be read from its start), and so is a single image file. A chunk of a folder or prefix carries its object
names, so a worker reads exactly them and never lists again; its id is a digest of the source and its first and
last names. Listing runs inside the Ray Data stream (a generator stage), so the first chunk is being captioned
while the rest of a million-object prefix is still being listed.

**Plan and resume.** Each chunk is saved under `_chunks/plan/` before it is handed on, and a source whose listing
finished leaves a `listed` file there; `_chunks/plan/sources.json` holds the resolved sources. A re-run of the
same run (same sources and output) reads that plan back, skips chunks whose marker says done, redoes only the
uncommitted rows of the others (a tar shard is streamed again, its committed members passed over without
decoding), and goes on listing a source from after its last planned name. The sources are the run's snapshot:
files added to a folder after its listing finished belong to a new run (`--run-id`).

**Rows.** Every object becomes one row: `ok` with a caption (and an answer with a question), `blocked` by the
safety policy (its image never reaches `dataset/` or an `image_uri`), `rejected` with the reason (not an
image, corrupt or truncated, zero bytes, over the byte or pixel cap, an unsafe member name, a link or a
device), or `failed` (the model call failed after retries; a re-run retries it). Companions (.txt, .json, ...)
and directories are not rows. Images are decoded, converted by the rules in `factory.io.images` and shrunk
to the VLM profile's `max_pixels` here, in the workers, in threads that run ahead of the model calls; the
replica gets RGB pixels and only runs the models.

**Exact duplicates** (same sha256 of the bytes) are captioned once per run. The first copy to claim the digest
(`_dedup/<sha[:2]>/<sha>`, a conditional put naming its row id and chunk) is captioned; every other copy waits,
at the end of its chunk, for that row to be committed and gets a row of its own with the same caption, answer
and verdict, `duplicate_of` set to the captioned row's id and no model time. A copy still waiting after
`dedup_wait_s` (its owner's chunk not running, on a resume) is captioned itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import posixpath
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.errors import ConfigError, FactoryError, InputError, one_line, validation_problems
from factory.io.archives import (
    ArchiveSource, Entry, list_folder, list_prefix, read_file_entry, read_folder_entries, read_prefix_entries,
    read_tar_entries, read_zip_entries, resolve_sources, zip_member_count,
)
from factory.io.images import PreparedImage, prepare_image
from factory.io.layout import OutputLayout
from factory.jobs.durable import check_durable_output
from factory.io.storage import Storage, join
from factory.jobs.caller import CallContext, ChunkCaller, JobStopped
from factory.jobs.commit import (
    DONE, DONE_WITH_FAILURES, STARTED, ChunkCommitter, committed_parts, publish_rejects, read_committed, stats_of,
    write_marker,
)
from factory.jobs.dedup import DedupIndex
from factory.jobs.progress import Progress
from factory.jobs.spec import ArchiveSpec, JobSpec, apply_override
from factory.jobs.summary import ChunkStats, RunSummary, summarize_run
from factory.jobs.validate import ValidateContext
from factory.routing.batch import ReplicaCall
from factory.routing.executor import base_result
from factory.routing.requests import Status, Task, TaskRequest, TaskResult

log = structlog.get_logger(__name__)

SOURCES_FILE = "sources.json"
# The safety detector reads 320x320: the worker never shrinks an image below that, whatever the VLM's budget
# (the VLM wrapper applies its own, smaller, bound).
DETECTOR_PIXELS = 320 * 320
PLAN_READERS = 16
_DATASET_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STATUS_ORDER = {Status.FAILED: 3, Status.REJECTED: 2, Status.BLOCKED: 1, Status.OK: 0}


class ArchiveChunk(BaseModel):
    """One chunk of one archive source: what a worker needs to read exactly its objects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    source: int = Field(description="Index of the source in the run's sources")
    kind: str
    uri: str = Field(description="Folder, prefix, tar shard, zip file or image file")
    label: str = Field(default="", description="What the rows' ids start with (an archive file's name)")
    seq: int = Field(default=0, description="Position of the chunk in its source")
    offset: int = Field(default=0, description="Objects of the source before this chunk")
    names: tuple[str, ...] = Field(default=(), description="Folder or prefix: the objects, relative to uri")
    first: int | None = Field(default=None, description="Zip: first member (central-directory order, 0-based)")
    last: int | None = Field(default=None, description="Zip: last member, inclusive")

    @property
    def objects(self) -> int:
        if self.names:
            return len(self.names)
        if self.first is not None and self.last is not None:
            return self.last - self.first + 1
        return 0

    def row_id(self, name: str) -> str:
        if self.kind == "file" or not name:
            return self.label
        return f"{self.label}/{name}" if self.label else name


def archive_chunk(source_index: int, source: ArchiveSource, seq: int = 0, offset: int = 0,
                  names: tuple[str, ...] = (), first: int | None = None, last: int | None = None) -> ArchiveChunk:
    ends = f"{names[0]}|{names[-1]}|{len(names)}" if names else f"{first}-{last}"
    digest = hashlib.sha256(f"{source.kind}|{source.uri}|{ends}".encode()).hexdigest()[:16]
    return ArchiveChunk(id=digest, source=source_index, kind=source.kind, uri=source.uri, label=source.label,
                        seq=seq, offset=offset, names=names, first=first, last=last)


# ---- planning, inside the Ray Data stream ----------------------------------------------------------------


@dataclass(frozen=True)
class PlanContext:
    storage: Storage
    layout: OutputLayout
    sources: tuple[ArchiveSource, ...]
    chunk_objects: int
    tally: Any = None
    output: str = ""  # the job's output (DEST): never listed as an input when it lies inside a source


def chunk_file_name(source: int, seq: int) -> str:
    return f"s{source:05d}-c{seq:08d}.json"


def listed_file_name(source: int) -> str:
    return f"s{source:05d}-listed.json"


def plan_chunks(batch: dict[str, np.ndarray], ctx: PlanContext) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF over work items: a planned chunk passes through; a source to list yields its
    chunks one by one as the listing goes (each saved to the plan first)."""
    for text in batch["item"]:
        item = json.loads(text)
        if "chunk" in item:
            yield {"chunk": np.array([item["chunk"]], dtype=object)}
            continue
        for chunk in list_source(ctx, item["source"], item.get("after"), item.get("seq", 0), item.get("offset", 0)):
            yield {"chunk": np.array([chunk.model_dump_json()], dtype=object)}


def _output_inside(output: str, source: str) -> str | None:
    """The output's path relative to a folder or prefix that holds it ('out/'), or None."""
    root = source.rstrip("/") + "/"
    return output.rstrip("/")[len(root):] + "/" if output.startswith(root) else None


def list_source(ctx: PlanContext, index: int, after: Any, seq: int, offset: int) -> Iterator[ArchiveChunk]:
    """The chunks of a folder, prefix or zip from after `after` (a name, or a zip member index), saved as they
    are made; the source's `listed` file when it is exhausted."""
    source = ctx.sources[index]
    objects = 0

    def emit(chunk: ArchiveChunk) -> ArchiveChunk:
        ctx.storage.write_bytes(ctx.layout.archive_plan_file(chunk_file_name(index, chunk.seq)),
                                chunk.model_dump_json().encode())
        if ctx.tally is not None:
            ctx.tally.add.remote({"planned": chunk.objects})
        return chunk

    if source.kind == "zip":
        try:
            count = zip_member_count(ctx.storage, source.uri)
        except InputError as error:
            # The zip as a whole is unreadable: one chunk of it, whose worker reports why as one rejected row.
            count, problem = 1, error
        else:
            problem = None
        start = 0 if after is None else int(after) + 1
        for first in range(start, count, ctx.chunk_objects):
            last = min(count, first + ctx.chunk_objects) - 1
            yield emit(archive_chunk(index, source, seq, first, first=first, last=last))
            seq, objects = seq + 1, objects + last - first + 1
        if problem is not None:
            log.info("zip unreadable", source=source.uri, reason=str(problem))
    else:
        names = list_folder(source.uri, after) if source.kind == "folder" else list_prefix(ctx.storage, source.uri, after)
        inside = _output_inside(ctx.output, source.uri)
        page: list[str] = []
        for name in names:
            if inside is not None and (name + "/").startswith(inside):
                continue  # DEST inside the source: this run's own output is not an input
            page.append(name)
            if len(page) >= ctx.chunk_objects:
                yield emit(archive_chunk(index, source, seq, offset, names=tuple(page)))
                seq, offset, objects, page = seq + 1, offset + len(page), objects + len(page), []
        if page:
            yield emit(archive_chunk(index, source, seq, offset, names=tuple(page)))
            objects += len(page)
    ctx.storage.write_bytes(ctx.layout.archive_plan_file(listed_file_name(index)),
                            json.dumps({"source": source.uri, "objects_this_attempt": objects}).encode())


@dataclass
class SavedPlan:
    chunks: dict[int, list[ArchiveChunk]]  # source index -> its planned chunks, in order
    listed: set[int]


def read_plan(storage: Storage, layout: OutputLayout) -> SavedPlan:
    chunk_uris, listed = [], set()
    for uri in storage.list_files(layout.archive_plan):
        name = posixpath.basename(uri)
        if name.endswith("-listed.json"):
            listed.add(int(name[1:6]))
        elif re.fullmatch(r"s\d{5}-c\d{8}\.json", name):
            chunk_uris.append(uri)
    with ThreadPoolExecutor(PLAN_READERS) as pool:
        chunks = list(pool.map(lambda uri: ArchiveChunk.model_validate_json(storage.read_bytes(uri)), chunk_uris))
    by_source: dict[int, list[ArchiveChunk]] = {}
    for chunk in sorted(chunks, key=lambda c: (c.source, c.seq)):
        by_source.setdefault(chunk.source, []).append(chunk)
    return SavedPlan(by_source, listed)


def check_sources(storage: Storage, layout: OutputLayout, sources: list[ArchiveSource], chunk_objects: int) -> None:
    """Save the run's sources on its first attempt; refuse to resume it over other sources."""
    uri = layout.archive_plan_file(SOURCES_FILE)
    current = {"chunk_objects": chunk_objects, "sources": [[s.kind, s.uri] for s in sources]}
    if storage.exists(uri):
        saved = json.loads(storage.read_bytes(uri))
        if saved != current:
            what = ("chunk_objects changed" if saved.get("chunk_objects") != chunk_objects
                    else "the sources changed")
            raise ConfigError(f"this run was started on other archive sources ({what}); finish it with the same "
                              "sources, or start a new run with another --run-id")
        return
    storage.write_bytes(uri, json.dumps(current).encode())


# ---- the model stage ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveWork:
    """What an archive caller needs besides the engine's CallContext; shipped to Ray workers."""

    archive: ArchiveSpec
    instruction: str | None
    budget_pixels: int


@dataclass
class _Item:
    """One object, read and prepared (or a finished row for it)."""

    row_id: str
    name: str
    source_uri: str
    position: int | None
    row: dict | None = None  # a row that needs no model (rejected)
    sha256: str | None = None
    prepared: PreparedImage | None = None
    rgb: bytes | None = None
    data: bytes | None = None  # the original bytes, kept only for a sidecar copy
    owner: tuple[str, str] | None = None  # (row id, chunk) of the copy that is captioned


@dataclass
class _ChunkRun:
    chunk: ArchiveChunk
    committer: ChunkCommitter
    stats: ChunkStats
    committed: set[str]
    tasks: list[asyncio.Task] = field(default_factory=list)
    deferred: list[_Item] = field(default_factory=list)
    local_owners: dict[str, tuple[str, str]] = field(default_factory=dict)


def dataset_stem(row_id: str, sha256: str) -> str:
    """A safe, unique file stem for a dataset copy: the object's name (letters, digits, '.', '_', '-') and its
    digest, so two sources' `cat.jpg` never collide and the name says where it came from."""
    stem = _UNSAFE.sub("_", posixpath.splitext(posixpath.basename(row_id))[0]).strip("._-")[:80] or "image"
    return f"{stem}-{sha256[:12]}"


class ArchiveCaller(ChunkCaller):
    """Ray Data actor UDF: one archive chunk per call; reads, decodes, sends batches, commits. See the module
    docstring. The replica calls, retries, commits and reports are the engine's (`ChunkCaller`)."""

    chunk_model = ArchiveChunk

    def __init__(self, ctx: CallContext, work: ArchiveWork):
        super().__init__(ctx)
        self.work = work
        self.archive = work.archive

    # ---- one chunk ----

    async def run_chunk(self, chunk: ArchiveChunk) -> ChunkStats:  # type: ignore[override]
        storage, layout = self.ctx.chunks.storage, self.ctx.chunks.layout
        committed_table = await asyncio.to_thread(self._prepare, chunk)
        committed = set(committed_table["id"].to_pylist())
        state = _ChunkRun(
            chunk=chunk, committed=committed, stats=stats_of(chunk.id, committed_table, 0),
            committer=ChunkCommitter(storage, layout, chunk.id, flush_rows=self.ctx.flush_rows,
                                     flush_seconds=self.ctx.flush_seconds),
        )
        await self._report({"settled": len(committed)})
        entries = self._entries(chunk, committed)
        positions = {name: index for index, name in enumerate(chunk.names)}
        per_batch = max(1, self.ctx.batch_size // (2 if self.archive.question else 1))
        batch: list[_Item] = []
        read = 0
        try:
            while True:
                item = await asyncio.to_thread(self._next_item, entries, chunk, committed, positions)
                if item is None:
                    break
                read += 1
                if item.row is not None:
                    state.committer.add(item.row)
                elif self.archive.dedup and await asyncio.to_thread(self._is_copy, item, state):
                    state.deferred.append(item)
                else:
                    batch.append(item)
                    if len(batch) >= per_batch:
                        await self._launch(state, batch)
                        batch = []
                await self._collect(state, wait=False)
            if batch:
                await self._launch(state, batch)
            await self._collect(state, wait=True)
            await self._flush(state.committer, state.stats)
            if state.deferred:
                await self._link_copies(state, per_batch)
        finally:
            for task in state.tasks:
                task.cancel()
        await asyncio.to_thread(write_marker, storage, layout, state.stats)
        # Companions were planned (listed) but are not rows: settled, so the progress line reaches its total.
        companions = max(0, len(chunk.names) - len(committed) - read) if chunk.names else 0
        await self._report({"chunks": 1, "rows_read": read, "settled": companions,
                            **({"planned": read} if not chunk.objects else {})})
        self.log.info("chunk committed", chunk=chunk.id, source=chunk.uri, rows=state.stats.rows,
                      **state.stats.by_status)
        return state.stats

    def _prepare(self, chunk: ArchiveChunk) -> pa.Table:
        """What earlier attempts committed of this chunk (failed rows uncommitted first, to retry them)."""
        store, layout, tenant = self.ctx.chunks.storage, self.ctx.chunks.layout, self.archive.tenant
        if store.exists(layout.chunk_file(chunk.id, STARTED)):
            for name in (DONE, DONE_WITH_FAILURES):
                store.delete(layout.chunk_file(chunk.id, name))
            return read_committed(store, committed_parts(store, layout, chunk.id, [tenant]),
                                  drop_failed=self.ctx.retry_failed)
        store.write_bytes(layout.chunk_file(chunk.id, STARTED), json.dumps({"tenants": [tenant]}).encode())
        return read_committed(store, {}, drop_failed=False)

    def _entries(self, chunk: ArchiveChunk, committed: set[str]) -> Iterator[Entry]:
        storage, cap = self.ctx.chunks.storage, self.archive.max_bytes
        skip = frozenset(name for name in (row_id.partition("/")[2] for row_id in committed if chunk.label) if name)
        if chunk.kind == "folder":
            return read_folder_entries(chunk.uri, [n for n in chunk.names if chunk.row_id(n) not in committed], cap)
        if chunk.kind == "prefix":
            names = [n for n in chunk.names if chunk.row_id(n) not in committed]
            return read_prefix_entries(storage, chunk.uri, names, cap)
        if chunk.kind == "tar":
            return read_tar_entries(storage, chunk.uri, cap, skip)
        if chunk.kind == "zip":
            return read_zip_entries(storage, chunk.uri, chunk.first or 0, chunk.last or 0, cap, skip)
        return read_file_entry(storage, chunk.uri, cap)

    def _next_item(self, entries: Iterator[Entry], chunk: ArchiveChunk, committed: set[str],
                   positions: dict[str, int]) -> _Item | None:
        """The next object of the chunk, read and prepared (in a worker thread: decoding runs ahead of the model
        calls); None at the end. `positions`: where each name of a folder or prefix chunk is in its listing."""
        for entry in entries:
            if entry.companion:
                continue
            row_id = chunk.row_id(entry.name)
            if row_id in committed:
                continue
            index = positions.get(entry.name)
            position = None if index is None else chunk.offset + index
            where = entry.uri if chunk.kind in ("folder", "prefix", "file") or not entry.name else f"{entry.uri}:{entry.name}"
            item = _Item(row_id=row_id, name=entry.name, source_uri=where, position=position)
            if entry.problem is not None or entry.data is None:
                item.row = self._row(chunk, item, Status.REJECTED, error=entry.problem or "no bytes were read")
                return item
            item.sha256 = hashlib.sha256(entry.data).hexdigest()
            try:
                item.prepared = prepare_image(entry.data, where, max_pixels=self.archive.max_pixels,
                                              budget_pixels=self.work.budget_pixels)
            except InputError as error:
                item.row = self._row(chunk, item, Status.REJECTED, error=str(error))
                return item
            item.rgb = item.prepared.image.tobytes()
            item.data = entry.data if self.archive.sidecars else None
            return item
        return None

    def _is_copy(self, item: _Item, state: _ChunkRun) -> bool:
        """Claim the image's digest for this row, or find the row that claimed it (then this is a copy)."""
        assert item.sha256 is not None
        owner = state.local_owners.get(item.sha256)
        if owner is None:
            storage, uri = self.ctx.chunks.storage, self.ctx.chunks.layout.sha_claim(item.sha256)
            mine = {"id": item.row_id, "chunk": state.chunk.id}
            if storage.put_if_absent(uri, json.dumps(mine).encode()):
                claimed = mine
            else:
                claimed = json.loads(storage.read_bytes(uri))
            owner = (claimed["id"], claimed["chunk"])
            state.local_owners[item.sha256] = owner
        if owner == (item.row_id, state.chunk.id):
            return False
        item.owner = owner
        return True

    async def _launch(self, state: _ChunkRun, items: list[_Item]) -> None:
        assert self._limit is not None
        await self._limit.acquire()  # backpressure: reading runs ahead of the model by at most in_flight images
        task = asyncio.ensure_future(self._caption(state.chunk, items))
        task.add_done_callback(lambda _: self._limit.release())  # type: ignore[union-attr]
        state.tasks.append(task)

    async def _collect(self, state: _ChunkRun, wait: bool) -> None:
        done = [task for task in state.tasks if wait or task.done()]
        for task in done:
            for row in await task:
                state.committer.add(row)
        state.tasks = [task for task in state.tasks if task not in done]
        if state.committer.due():
            await self._flush(state.committer, state.stats)

    async def _caption(self, chunk: ArchiveChunk, items: list[_Item]) -> list[dict]:
        """One replica call for a batch of images (caption, and the question's answer): one row per image."""
        started = time.perf_counter()
        calls = []
        for item in items:
            assert item.prepared is not None
            pixels = {"image_rgb": item.rgb, "image_size": item.prepared.image.size}
            calls.append(ReplicaCall(request=self._request(item, Task.CAPTION), **pixels))
            if self.archive.question:
                calls.append(ReplicaCall(request=self._request(item, Task.VQA), **pixels))
        results, attempts = await self._call(calls, self.log.bind(chunk=chunk.id))
        await self._report({"model_rows": len(items)})  # rows, not calls: a question rides with its caption
        per_item = 2 if self.archive.question else 1
        rows = []
        for index, item in enumerate(items):
            caption = results[index * per_item]
            answer = results[index * per_item + 1] if self.archive.question else None
            caption = await self._write_image(calls[index * per_item].request, caption)  # quarantine, if any
            rows.append(await asyncio.to_thread(self._model_row, chunk, item, caption, answer, attempts))
            self.metrics.record(caption, time.perf_counter() - started)
            item.rgb = None
        return rows

    def _request(self, item: _Item, task: Task) -> TaskRequest:
        return TaskRequest(
            id=item.row_id, tenant=self.archive.tenant, task=task, image=item.source_uri,
            prompt=self.work.instruction if task is Task.CAPTION else None,
            question=self.archive.question if task is Task.VQA else None,
        )

    def _model_row(self, chunk: ArchiveChunk, item: _Item, caption: TaskResult, answer: TaskResult | None,
                   attempts: int) -> dict:
        status, error = caption.status, caption.error
        if answer is not None and _STATUS_ORDER[answer.status] > _STATUS_ORDER[status]:
            status, error = answer.status, answer.error
        row = self._row(chunk, item, status, error=error, result=caption, attempts=attempts)
        if answer is not None:
            row.update(question=answer.question, answer=answer.answer if status is Status.OK else None,
                       latency_ms=(caption.latency_ms or 0.0) + (answer.latency_ms or 0.0),
                       safety_ms=(caption.safety_ms or 0.0) + (answer.safety_ms or 0.0))
        if status is not Status.OK:
            row.update(caption=None, answer=None)
        elif self.archive.sidecars:
            row["image_uri"] = self._write_sidecars(item, row["caption"] or "")
        return row

    def _write_sidecars(self, item: _Item, caption: str) -> str:
        """dataset/<stem>.<ext> (the image as it came) and dataset/<stem>.txt (its caption), image first; an
        image a rule changed (rotated, flattened, a first frame...) is written as the PNG the model saw the
        pixels of, at full size, so a trainer reads what was captioned."""
        assert item.prepared is not None and item.sha256 is not None and item.data is not None
        storage, layout = self.ctx.chunks.storage, self.ctx.chunks.layout
        stem = dataset_stem(item.row_id, item.sha256)
        if item.prepared.rule == "none":
            data, ext = item.data, _DATASET_EXT.get(item.prepared.format, "img")
        else:
            full = prepare_image(item.data, item.source_uri, max_pixels=self.archive.max_pixels)
            from factory.routing.executor import encode_png

            data, ext = encode_png(full.image), "png"
        image_uri = layout.dataset(f"{stem}.{ext}")
        storage.write_bytes(image_uri, data)
        storage.write_bytes(layout.dataset(f"{stem}.txt"), caption.encode())
        item.data = None
        return image_uri

    def _row(self, chunk: ArchiveChunk, item: _Item, status: Status, *, error: str | None = None,
             result: TaskResult | None = None, attempts: int = 0) -> dict:
        if result is None:
            request = TaskRequest(id=item.row_id, tenant=self.archive.tenant, task=Task.CAPTION,
                                  image=item.source_uri, prompt=self.work.instruction)
            result = base_result(request, None, status=status, error=error)
        row = result.model_dump(mode="json", exclude={"image_png", "quarantine_png"})
        prepared = item.prepared
        row.update(
            status=status.value, error=error, source_uri=item.source_uri, member=item.name, sha256=item.sha256,
            format=prepared.format if prepared else None, rule=prepared.rule if prepared else None,
            width=prepared.width if prepared else None, height=prepared.height if prepared else None,
            image_uri=None, attempts=attempts, run_id=self.ctx.chunks.run_id, manifest=chunk.uri,
            manifest_line=None if item.position is None else item.position + 1, finished_at=datetime.now(UTC), duplicate_of=None,
        )
        return row

    # ---- exact duplicates ----

    async def _link_copies(self, state: _ChunkRun, per_batch: int) -> None:
        """Rows for this chunk's copies, from the rows of the images they copy (waiting for them to be
        committed); copies whose image is not captioned within dedup_wait_s are captioned themselves."""
        deadline = time.monotonic() + self.archive.dedup_wait_s
        owners: dict[str, dict[str, dict]] = {}
        waiting = list(state.deferred)
        delay = 0.2
        while waiting:
            wanted = {item.owner[1] for item in waiting if item.owner is not None}
            for owner_chunk in wanted:
                owners[owner_chunk] = await asyncio.to_thread(self._committed_rows, owner_chunk)
            still = []
            for item in waiting:
                assert item.owner is not None
                found = owners.get(item.owner[1], {}).get(item.owner[0])
                if found is None:
                    still.append(item)
                else:
                    state.committer.add(self._copy_row(state.chunk, item, found))
            waiting = still
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 1.5)
        if waiting:
            self.log.info("copies captioned themselves: their image's row was not committed in time",
                          chunk=state.chunk.id, rows=len(waiting))
            for start in range(0, len(waiting), per_batch):
                await self._launch(state, waiting[start:start + per_batch])
            await self._collect(state, wait=True)
        await self._flush(state.committer, state.stats)

    def _committed_rows(self, chunk_id: str) -> dict[str, dict]:
        storage, layout = self.ctx.chunks.storage, self.ctx.chunks.layout
        table = read_committed(storage, committed_parts(storage, layout, chunk_id, [self.archive.tenant]),
                               drop_failed=False)
        return {row["id"]: row for row in table.to_pylist()}

    def _copy_row(self, chunk: ArchiveChunk, item: _Item, owner: dict) -> dict:
        row = self._row(chunk, item, Status(owner["status"]), error=owner["error"])
        for name in ("caption", "answer", "question", "profile", "model_version", "safety_verdict",
                     "safety_decided_by", "safety_labels", "safety_scores", "safety_reason", "image_uri"):
            row[name] = owner[name]
        row.update(latency_ms=0.0, safety_ms=0.0, duplicate_of=owner["id"])
        return row


# ---- the run --------------------------------------------------------------------------------------------


class _ArchiveProgress(Progress):
    """The progress line's total is what has been listed so far (it grows while sources are being listed)."""

    def line(self) -> str:
        self.total = self.counts.get("planned", 0) - self.base.get("planned", 0)
        return super().line()


def caption_instruction(prompt: str | None) -> str | None:
    """`Describe: a short alt text` -> `a short alt text` (as in manifests); a plain prompt is the instruction."""
    if prompt is None:
        return None
    text = prompt.strip()
    if text.lower().startswith("describe:"):
        text = text[len("describe:"):].strip()
    return text or None


def run_archive_job(spec: JobSpec, run_id: str | None = None, address: str | None = None,
                    show_progress: bool = True, retry_failed: bool | None = None) -> RunSummary:
    import ray

    from factory.jobs.cluster import connect, default_app_name, deploy, release, wait_until_ready
    from factory.jobs.runs import (
        budget_stop, chunk_finished, chunk_states, generation_defaults, read_markers, start_tally, worker_failure,
    )
    from factory.model.profiles import get_profile

    assert spec.archive is not None
    archive = spec.archive
    started = time.monotonic()
    run_id = run_id or spec.name
    retry_failed = spec.retry_failed if retry_failed is None else retry_failed
    storage = Storage()
    check_durable_output(spec.output)
    layout = OutputLayout(join(spec.output, run_id))
    run_log = log.bind(job=spec.name, run_id=run_id)
    sources = resolve_sources(archive.sources, storage)
    check_sources(storage, layout, sources, archive.chunk_objects)
    saved = read_plan(storage, layout)
    states = chunk_states(storage, layout)
    if storage.exists(layout.success):
        storage.delete(layout.success)

    items: list[dict] = []
    known_pending = 0
    for index, source in enumerate(sources):
        if source.kind in ("tar", "file"):
            chunk = archive_chunk(index, source)
            if not chunk_finished(states.get(chunk.id, set()), retry_failed):
                items.append({"chunk": chunk.model_dump_json()})
            continue
        planned = saved.chunks.get(index, [])
        for chunk in planned:
            if not chunk_finished(states.get(chunk.id, set()), retry_failed):
                items.append({"chunk": chunk.model_dump_json()})
                known_pending += chunk.objects
        if index not in saved.listed:
            tail = planned[-1] if planned else None
            after = None if tail is None else (tail.last if source.kind == "zip" else tail.names[-1])
            items.append({"source": index, "after": after, "seq": tail.seq + 1 if tail else 0,
                          "offset": tail.offset + tail.objects if tail else 0})

    connect(address)
    tally = start_tally(spec)
    if known_pending:
        tally.add.remote({"planned": known_pending})
    progress = _ArchiveProgress(tally, enabled=show_progress)
    app_name = spec.serve.app_name or default_app_name(spec.name)
    owned = spec.serve.app_name is None
    fresh: dict[str, ChunkStats] = {}
    run_log.info("archive run starting", sources=len(sources), work_items=len(items), output=layout.root)
    context = ray.data.DataContext.get_current()
    saved_block_size = context.target_max_block_size
    try:
        if items:
            deploy(spec, app_name, None, owned=owned)
            wait_until_ready(app_name, spec.serve.ready_timeout_s)
            progress.phase("images", 0, "settled", "ok", "blocked", "rejected", "failed")
            vlm = get_profile(spec.profile).vlm
            work = ArchiveWork(archive=archive, instruction=caption_instruction(archive.prompt),
                               budget_pixels=max(vlm.max_pixels or DETECTOR_PIXELS, DETECTOR_PIXELS))
            chunks_ctx = ValidateContext(run_id=run_id, layout=layout, storage=storage,
                                         defaults=generation_defaults(spec), shards=1, tally=tally)
            ctx = CallContext(
                job=spec.name, chunks=chunks_ctx, dedup=DedupIndex(shards=1), app_name=app_name,
                in_flight=spec.in_flight, row_timeout_s=spec.row_timeout_s, retry=spec.retry, allow_http=False,
                batch_size=spec.serve.max_batch_size, flush_rows=spec.commit.rows,
                flush_seconds=spec.commit.seconds, adapter_window=None, retry_failed=retry_failed,
            )
            plan_ctx = PlanContext(storage=storage, layout=layout, sources=tuple(sources),
                                   chunk_objects=archive.chunk_objects, tally=tally, output=spec.output)
            # Each planned chunk leaves the listing stage as a block of its own, at once: with Ray Data's usual
            # block size, a generator's small outputs would be held back until the whole listing had finished.
            context.target_max_block_size = 1
            dataset = ray.data.from_items(
                [{"item": json.dumps(item)} for item in items], override_num_blocks=min(len(items), 1000),
            ).map_batches(
                plan_chunks, batch_size=1, fn_kwargs={"ctx": plan_ctx}, batch_format="numpy", num_cpus=0,
                max_retries=0,  # a listing that broke is resumed by a re-run from the plan, never listed twice
            ).map_batches(
                ArchiveCaller, batch_size=1, fn_constructor_kwargs={"ctx": ctx, "work": work}, batch_format="numpy",
                num_cpus=0, compute=ray.data.ActorPoolStrategy(
                    size=spec.callers, max_concurrent_calls_per_actor=spec.chunks_per_caller),
            )
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        stats = ChunkStats.model_validate_json(row["stats"])
                        fresh[stats.chunk] = stats
            except FactoryError:
                raise
            except Exception as error:
                stop = budget_stop(tally, spec.name, run_id, layout.root)
                if stop is not None:
                    raise stop from None
                raise worker_failure(error, spec.name, run_id, layout.root) from None
    finally:
        context.target_max_block_size = saved_block_size
        progress.close()
        if owned and not spec.serve.keep_warm and items:
            release(app_name)

    counts, _ = ray.get(tally.snapshot.remote())
    # Read again: the run planned the chunks of the sources it listed.
    saved = read_plan(storage, layout)
    # Every chunk is fresh or was skipped as finished, so `states` (listed at the start) names its marker.
    markers = read_markers(storage, layout, [(chunk.id, chunk.uri) for chunk in _all_chunks(saved, sources)],
                           states, fresh)
    problems = _unlisted(storage, layout, run_id, sources, saved)
    summary = summarize_run(markers, job=spec.name, run_id=run_id, output=layout.root, plan_rejects=problems,
                            rows_read=counts.get("rows_read", 0), rows_read_again=0,
                            model_rows=counts.get("model_rows", 0), wall_seconds=time.monotonic() - started)
    storage.write_bytes(layout.summary, summary.model_dump_json(indent=2).encode())
    storage.write_bytes(layout.success, b"")
    run_log.info("archive run finished", **summary.by_status)
    return summary


def _all_chunks(saved: SavedPlan, sources: list[ArchiveSource]) -> list[ArchiveChunk]:
    chunks = []
    for index, source in enumerate(sources):
        if source.kind in ("tar", "file"):
            chunks.append(archive_chunk(index, source))
        else:
            chunks.extend(saved.chunks.get(index, []))
    return chunks


def _unlisted(storage: Storage, layout: OutputLayout, run_id: str, sources: list[ArchiveSource],
              saved: SavedPlan) -> int:
    """Sources that listed nothing at all (an empty folder or prefix): one reject each, in rejects/tenant=_unknown/,
    so a typo'd prefix is visible in the output and not only as a zero in the summary."""
    rejects = []
    for index, source in enumerate(sources):
        if source.kind in ("folder", "prefix") and not saved.chunks.get(index):
            rejects.append({"manifest": source.uri, "manifest_line": 0, "id": None, "tenant": None,
                            "field": "source", "reason": f"{source.uri}: no objects found", "row": None,
                            "run_id": run_id})
    publish_rejects(storage, layout, rejects, "plan")  # no tenant: rejects/tenant=_unknown/
    return len(rejects)


# ---- the command's spec ----------------------------------------------------------------------------------


def caption_spec(sources: list[str], output: str, *, prompt: str | None = None, question: str | None = None,
                 sidecars: bool = False, profile: str = "tiny", overrides: list[str] = ()) -> JobSpec:
    """The job spec `factory caption` runs: the same spec as a job file with an archive section."""
    data: dict[str, Any] = {
        "name": "caption", "output": output, "profile": profile,
        "archive": {"sources": list(sources), "sidecars": sidecars,
                    **({"prompt": prompt} if prompt is not None else {}),
                    **({"question": question} if question is not None else {})},
    }
    for override in overrides:
        apply_override(data, override)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"factory caption: {one_line(validation_problems(error))}") from None


def default_run_id(spec: JobSpec) -> str:
    """`caption-<digest of the sources>`: the same sources and output resume the same run, others start one."""
    assert spec.archive is not None
    digest = hashlib.sha256(json.dumps(sorted(spec.archive.sources)).encode()).hexdigest()[:8]
    return f"{spec.name}-{digest}"


def rows_of(storage: Storage, root: str) -> list[dict]:
    """Every result row of an archive run (for people and tests)."""
    from factory.jobs.commit import read_table

    table = read_table(storage, OutputLayout(root).results, hive=True)
    return [] if table is None else table.to_pylist()


__all__ = ["ArchiveCaller", "ArchiveChunk", "caption_spec", "default_run_id", "run_archive_job", "JobStopped"]
