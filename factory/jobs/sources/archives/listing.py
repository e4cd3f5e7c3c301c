"""Planning archives: chunks cut as the sources are listed, saved as they are made, resumed from a cursor.

A folder, an s3:// prefix or a zip is cut into chunks of `chunk_objects` objects as it is listed (names in a
stable sorted order; a zip's members in central-directory order); a tar shard is one chunk (a tar can only be
read from its start), and so is a single image file. A chunk of a folder or prefix carries its object names, so a
worker reads exactly them and never lists again; its id is a digest of the source and its first and last names.
Listing runs inside the Ray Data stream (`plan_chunks`, a generator stage), so the first chunk is being captioned
while the rest of a million-object prefix is still being listed.

Each chunk is saved under `_chunks/plan/` before it is handed on, and a source whose listing finished leaves a
`listed` file there; `_chunks/plan/sources.json` holds the resolved sources. A re-run of the same run reads that
plan back and goes on listing a source from after its last planned name (the cursor). The sources are the
run's snapshot: files added to a folder after its listing finished belong to a new run, and a different set of
sources is refused for the same run id (`check_sources`).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError, InputError
from factory.io.archives import ArchiveSource, list_folder, list_prefix, zip_member_count
from factory.io.layout import OutputLayout
from factory.io.storage import Storage

log = structlog.get_logger(__name__)

SOURCES_FILE = "sources.json"
PLAN_READERS = 16


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


def planned_chunks(saved: SavedPlan, sources: list[ArchiveSource]) -> list[ArchiveChunk]:
    """Every chunk of the run's sources as planned so far: a tar shard or a file is one chunk (never saved)."""
    chunks = []
    for index, source in enumerate(sources):
        if source.kind in ("tar", "file"):
            chunks.append(archive_chunk(index, source))
        else:
            chunks.extend(saved.chunks.get(index, []))
    return chunks
