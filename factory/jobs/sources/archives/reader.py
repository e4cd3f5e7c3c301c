"""Reading archive chunks on the workers: every object becomes one row.

An object is read, its bytes hashed, decoded and converted by the rules of `factory.io.images` and shrunk to the
VLM profile's `max_pixels` here, in the worker thread that runs ahead of the model calls; the replica gets RGB
pixels and only runs the models (the safety check included). Companions (.txt, .json, ...) and directories are not
rows. An object that is not a usable image (not an image, corrupt or truncated, zero bytes, over the byte or
pixel cap, an unsafe member name, a link or a device) is a `rejected` row at once, with the reason. A tar shard is
streamed again on a resume, its committed members passed over without decoding.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from factory.errors import InputError
from factory.io.archives import (
    Entry, read_file_entry, read_folder_entries, read_prefix_entries, read_tar_entries, read_zip_entries,
)
from factory.io.images import prepare_image
from factory.jobs.engine.source import ChunkDuplicates, ChunkInput, Item, ReplicaReader, RunContext
from factory.jobs.engine.writers import ImageWriter
from factory.jobs.sources.archives.copies import DigestClaims
from factory.jobs.sources.archives.listing import ArchiveChunk
from factory.jobs.sources.archives.rows import ArchiveObject, ArchiveRows
from factory.jobs.spec import ArchiveSpec
from factory.routing.batch import ReplicaCall
from factory.routing.requests import Status, Task, TaskResult

# The safety detector reads 320x320: the worker never shrinks an image below that, whatever the VLM's budget
# (the VLM wrapper applies its own, smaller, bound).
DETECTOR_PIXELS = 320 * 320


@dataclass(frozen=True)
class ArchiveWork:
    """What reading a job's archives needs; shipped to Ray workers."""

    archive: ArchiveSpec
    budget_pixels: int  # an image is shrunk to this many pixels before it is sent


class ArchiveReader(ReplicaReader):
    """The archives' side on the workers; see the module docstring."""

    chunk_model = ArchiveChunk

    def __init__(self, run: RunContext, work: ArchiveWork):
        self.run, self.work, self.archive = run, work, work.archive
        self.rows = ArchiveRows(run, work.archive)
        self.images = ImageWriter(run.storage, run.layout)

    def where(self, chunk: ArchiveChunk) -> str:
        return chunk.uri

    def open(self, chunk: ArchiveChunk) -> ChunkInput:
        done_counts: dict[str, int] = {}
        duplicates = DigestClaims(self.run, self.rows, chunk) if self.archive.dedup else ChunkDuplicates()
        return ChunkInput(tenants=[self.archive.tenant], rejects=0, duplicates=duplicates, done_counts=done_counts,
                          items=lambda committed: self._items(chunk, committed, done_counts))

    def _items(self, chunk: ArchiveChunk, committed_rows: pa.Table, done_counts: dict[str, int]) -> Iterator[Item]:
        """The chunk's objects not committed yet, read and prepared one by one; when it is exhausted,
        `done_counts` says what the chunk read (and, for a chunk whose objects were unknown until read, planned)."""
        committed = set(committed_rows["id"].to_pylist())
        positions = {name: index for index, name in enumerate(chunk.names)}
        read = 0
        for entry in self._entries(chunk, committed):
            if entry.companion:
                continue
            row_id = chunk.row_id(entry.name)
            if row_id in committed:
                continue
            read += 1
            yield self._item(chunk, entry, row_id, positions)
        # Companions were planned (listed) but are not rows: settled, so the progress line reaches its total.
        companions = max(0, len(chunk.names) - len(committed) - read) if chunk.names else 0
        done_counts.update(rows_read=read, settled=companions, **({"planned": read} if not chunk.objects else {}))

    def _entries(self, chunk: ArchiveChunk, committed: set[str]) -> Iterator[Entry]:
        storage, cap = self.run.storage, self.archive.max_bytes
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

    def _item(self, chunk: ArchiveChunk, entry: Entry, row_id: str, positions: dict[str, int]) -> Item:
        """One object, read and prepared; or its rejected row."""
        index = positions.get(entry.name)
        where = (entry.uri if chunk.kind in ("folder", "prefix", "file") or not entry.name
                 else f"{entry.uri}:{entry.name}")
        obj = ArchiveObject(name=entry.name, source_uri=where, position=None if index is None else chunk.offset + index)
        item = Item(row_id=row_id, tenant=self.archive.tenant, calls=2 if self.archive.question else 1, data=obj)
        if entry.problem is not None or entry.data is None:
            item.row = self.rows.row(chunk.uri, row_id, obj, Status.REJECTED,
                                     error=entry.problem or "no bytes were read")
            return item
        obj.sha256 = item.digest = hashlib.sha256(entry.data).hexdigest()
        try:
            obj.prepared = prepare_image(entry.data, where, max_pixels=self.archive.max_pixels,
                                         budget_pixels=self.work.budget_pixels)
        except InputError as error:
            item.row = self.rows.row(chunk.uri, row_id, obj, Status.REJECTED, error=str(error))
            return item
        obj.rgb = obj.prepared.image.tobytes()
        obj.data = entry.data if self.archive.sidecars else None
        return item

    async def calls(self, item: Item) -> list[ReplicaCall]:
        """A caption of the object's pixels, and the answer to the job's question about them."""
        obj: ArchiveObject = item.data
        assert obj.prepared is not None
        pixels = {"image_rgb": obj.rgb, "image_size": obj.prepared.image.size}
        tasks = (Task.CAPTION, Task.VQA) if self.archive.question else (Task.CAPTION,)
        return [ReplicaCall(request=self.rows.request(item.row_id, obj, task), **pixels) for task in tasks]

    async def row(self, chunk: ArchiveChunk, item: Item, results: list[TaskResult], attempts: int) -> dict:
        """One row of the caption and the answer (a flagged image quarantined, if the policy says so)."""
        obj: ArchiveObject = item.data
        caption = await self.images.write(self.archive.tenant, item.row_id, results[0])
        answer = results[1] if self.archive.question else None
        row = await asyncio.to_thread(self.rows.model_row, chunk.uri, item.row_id, obj, caption, answer, attempts)
        obj.rgb = None
        return row
