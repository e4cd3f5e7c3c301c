"""A training data set cut into chunks, on the driver: names only, no image is read here.

A folder or an s3:// prefix is listed and cut between stems (`cat.png` and `cat.txt` always land in one chunk) into
chunks of `encoding.chunk_images` stems; a tar shard is one chunk, and so is each Parquet file of a caption run's
results. A chunk's identity is its source's position and its sequence, so the same sources give the same chunks;
tar shards and results files carry their size and version (S3 ETag, local mtime). The plan is saved under the run's
`_chunks/plan.json`: a re-run lists the sources again and refuses them when the plan they give is another (a file
added, removed or changed), as a manifest run refuses changed manifests.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError, InputError
from factory.io.archives import list_folder, list_prefix, resolve_sources
from factory.io.storage import Storage

log = structlog.get_logger(__name__)

ChunkKind = Literal["folder", "prefix", "tar", "results"]


class TrainingChunk(BaseModel):
    """One chunk of a training data set: some stems of a folder or prefix, one tar shard, or one results file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="'<source index>-<sequence>': names its markers, latents parts and rejects")
    kind: ChunkKind = Field(description="How the chunk is read")
    source_index: int = Field(ge=0, description="Which of the spec's sources it came from (sample ids start with it)")
    uri: str = Field(description="The folder, prefix, shard or results Parquet file")
    names: tuple[str, ...] = Field(default=(), description="Folder/prefix members, grouped by stem")
    version: str | None = Field(default=None, description="A shard's or results file's size and version")


class TrainingPlan(BaseModel):
    """`_chunks/plan.json` of a training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[str, ...] = Field(description="The spec's sources, in order")
    chunk_images: int = Field(description="Stems per folder or prefix chunk")
    chunks: tuple[TrainingChunk, ...] = Field(description="Every chunk, in source order")


def is_results_source(uri: str) -> bool:
    """A caption run's results: a .parquet file, or a folder named results/."""
    stripped = uri.rstrip("/")
    return stripped.endswith(".parquet") or posixpath.basename(stripped) == "results"


def stem(name: str) -> str:
    return posixpath.splitext(name)[0]


def check_sources(sources: list[str], storage: Storage, first: int = 0) -> None:
    """Refuse, before Ray starts, a source that is missing or of a kind that cannot train (a zip); `first`: the
    index of `sources[0]` among the spec's."""
    for index, uri in enumerate(sources, start=first):
        if is_results_source(uri):
            if uri.endswith(".parquet") and not storage.exists(uri):
                raise ConfigError(f"sources[{index}] {uri}: no such results file")
            continue
        for source in resolve_sources([uri], storage):
            if source.kind not in ("folder", "prefix", "tar"):
                raise ConfigError(f"sources[{index}] {source.uri}: a {source.kind} is not a training source (use "
                                  "a folder, an s3:// prefix, tar shards or a caption run's results)")


def plan_chunks(sources: list[str], storage: Storage, chunk_images: int) -> TrainingPlan:
    """The chunks of every source, in the spec's order (names and versions only)."""
    chunks: list[TrainingChunk] = []
    for index, uri in enumerate(sources):
        if is_results_source(uri):
            files = [uri] if uri.endswith(".parquet") else list(storage.list_files(uri, suffixes=[".parquet"]))
            if not files:
                raise ConfigError(f"sources[{index}] {uri}: no .parquet results files there")
            chunks.extend(_file_chunk(index, "results", file, len(chunks) + seq, storage)
                          for seq, file in enumerate(files))
            continue
        check_sources([uri], storage, first=index)
        for source in resolve_sources([uri], storage):
            if source.kind == "tar":
                chunks.append(_file_chunk(index, "tar", source.uri, len(chunks), storage))
                continue
            try:
                names = list(list_folder(source.uri) if source.kind == "folder" else list_prefix(storage, source.uri))
            except InputError as error:
                raise ConfigError(f"sources[{index}]: {error}") from None
            chunks.extend(_stem_chunks(index, source.kind, source.uri, names, chunk_images, len(chunks)))
    return TrainingPlan(sources=tuple(sources), chunk_images=chunk_images, chunks=tuple(chunks))


def load_or_build_plan(sources: list[str], storage: Storage, chunk_images: int, plan_uri: str) -> TrainingPlan:
    """This run's plan: built and saved on its first attempt; on a later one, the saved plan when listing the
    sources again gives the same one, else a refusal naming the first difference."""
    plan = plan_chunks(sources, storage, chunk_images)
    if not storage.exists(plan_uri):
        storage.write_bytes(plan_uri, plan.model_dump_json().encode())
        log.info("plan saved", chunks=len(plan.chunks))
        return plan
    saved = TrainingPlan.model_validate_json(storage.read_bytes(plan_uri))
    if saved != plan:
        raise ConfigError(f"the sources of this run changed since it started ({_first_change(saved, plan)}); "
                          "finish it with the same sources, or start a new run with another --run-id")
    return saved


def _first_change(saved: TrainingPlan, fresh: TrainingPlan) -> str:
    if saved.sources != fresh.sources or saved.chunk_images != fresh.chunk_images:
        return "other sources or encoding.chunk_images"
    for before, now in zip(saved.chunks, fresh.chunks, strict=False):
        if before != now:
            return f"{before.uri}: {'its files differ' if before.names != now.names else 'it was rewritten'}"
    return f"{abs(len(saved.chunks) - len(fresh.chunks))} chunk(s) more or fewer"


def _file_chunk(index: int, kind: ChunkKind, uri: str, seq: int, storage: Storage) -> TrainingChunk:
    try:
        size, version = storage.stat(uri)
    except InputError:  # a shard named by a pattern that is missing: its reader rejects it, the others run
        size, version = 0, "missing"
    return TrainingChunk(id=f"{index:03d}-{seq:05d}", kind=kind, source_index=index, uri=uri,
                         version=f"{size}:{version}")


def _stem_chunks(index: int, kind: ChunkKind, uri: str, names: list[str], per_chunk: int, first: int
                 ) -> Iterator[TrainingChunk]:
    by_stem: dict[str, list[str]] = {}
    for name in names:
        by_stem.setdefault(stem(name), []).append(name)
    groups = list(by_stem.values())
    for seq, start in enumerate(range(0, len(groups), per_chunk)):
        members = tuple(name for group in groups[start:start + per_chunk] for name in group)
        yield TrainingChunk(id=f"{index:03d}-{first + seq:05d}", kind=kind, source_index=index, uri=uri,
                            names=members)
