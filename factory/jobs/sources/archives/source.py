"""Image archives as a source (`factory caption`, or a job spec with an `archive:` section): local folders, s3://
prefixes, tar shards and zip files, every image in them one row.

Planned as the run goes (`factory.jobs.sources.archives.listing`): a re-run reads back the chunks planned so far
and goes on listing from its cursor, and the sources are checked against the run's first attempt. No pre-pass:
an object is checked as a worker reads it (`reader`), and exact copies are claimed and linked during the model
stage (`copies`).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

from factory.errors import ConfigError, one_line, validation_problems
from factory.io.archives import ArchiveSource as ArchiveInput
from factory.io.archives import resolve_sources
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import publish_rejects, read_table
from factory.jobs.engine.counts import ChunkStats
from factory.jobs.engine.model_stage import ReplicaStage
from factory.jobs.engine.resume import chunk_finished
from factory.jobs.engine.source import Pending, Planned, RunContext, Source
from factory.jobs.sources.archives.listing import (
    PlanContext, SavedPlan, archive_chunk, check_sources, plan_chunks, planned_chunks, read_plan,
)
from factory.jobs.sources.archives.reader import DETECTOR_PIXELS, ArchiveReader, ArchiveWork
from factory.jobs.spec import JobSpec, apply_override

PLAN_REJECTS = "plan"
LISTINGS_AT_ONCE = 1000  # blocks of listing work items: sources listed in parallel, at most


class ArchiveSource(Source):
    """Archives; see the module docstring."""

    counts = "images"

    def __init__(self, spec: JobSpec, run: RunContext):
        assert spec.archive is not None
        self.spec, self.run, self.archive = spec, run, spec.archive
        self.sources: list[ArchiveInput] = []
        self.saved = SavedPlan({}, set())

    def plan(self) -> None:
        """Resolve the sources (a folder that cannot be listed stops here, with the errno), refuse other sources
        than this run's first attempt had, and read back the chunks planned so far."""
        storage, layout = self.run.storage, self.run.layout
        self.sources = resolve_sources(self.archive.sources, storage)
        check_sources(storage, layout, self.sources, self.archive.chunk_objects)
        self.saved = read_plan(storage, layout)

    def pending(self, states: dict[str, set[str]], retry_failed: bool) -> Pending:
        """Planned chunks not finished, and for each source not listed to its end, where to go on listing."""
        work: list[dict] = []
        known = 0
        for index, source in enumerate(self.sources):
            if source.kind in ("tar", "file"):
                chunk = archive_chunk(index, source)
                if not chunk_finished(states.get(chunk.id, set()), retry_failed):
                    work.append({"chunk": chunk.model_dump_json()})
                continue
            planned = self.saved.chunks.get(index, [])
            for chunk in planned:
                if not chunk_finished(states.get(chunk.id, set()), retry_failed):
                    work.append({"chunk": chunk.model_dump_json()})
                    known += chunk.objects
            if index not in self.saved.listed:
                tail = planned[-1] if planned else None
                after = None if tail is None else (tail.last if source.kind == "zip" else tail.names[-1])
                work.append({"source": index, "after": after, "seq": tail.seq + 1 if tail else 0,
                             "offset": tail.offset + tail.objects if tail else 0})
        return Pending(work=work, rows=known, listed=True)

    @contextmanager
    def stream(self, pending: Pending):
        """Chunks as they are listed: planned ones pass through, a source to list yields its chunks one by one."""
        import ray

        context = ray.data.DataContext.get_current()
        saved_block_size = context.target_max_block_size
        # Each planned chunk leaves the listing stage as a block of its own, at once: with Ray Data's usual block
        # size, a generator's small outputs would be held back until the whole listing had finished.
        context.target_max_block_size = 1
        try:
            yield ray.data.from_items(
                [{"item": json.dumps(item)} for item in pending.work],
                override_num_blocks=min(len(pending.work), LISTINGS_AT_ONCE),
            ).map_batches(
                plan_chunks, batch_size=1, fn_kwargs={"ctx": self.listing()}, batch_format="numpy", num_cpus=0,
                max_retries=0,  # a listing that broke is resumed by a re-run from the plan, never listed twice
            )
        finally:
            context.target_max_block_size = saved_block_size

    def listing(self) -> PlanContext:
        """What the stream's listing stage (`plan_chunks`) needs; shipped to Ray workers."""
        return PlanContext(storage=self.run.storage, layout=self.run.layout, sources=tuple(self.sources),
                           chunk_objects=self.archive.chunk_objects, tally=self.run.tally, output=self.spec.output)

    def reader(self) -> ArchiveReader:
        from factory.model.profiles import get_profile

        vlm = get_profile(self.spec.profile).vlm
        return ArchiveReader(self.run, ArchiveWork(
            archive=self.archive, budget_pixels=max(vlm.max_pixels or DETECTOR_PIXELS, DETECTOR_PIXELS)))

    def stage(self, retry_failed: bool) -> ReplicaStage:
        return ReplicaStage(self.spec, retry_failed=retry_failed)  # captions take no adapter: no registry

    def planned(self) -> Planned:
        """The chunks of the sources the run listed (its plan, read again), and a reject for each source that
        listed nothing at all (an empty folder or prefix), in rejects/tenant=_unknown/, so a typo'd prefix is
        visible in the output and not only as a zero."""
        self.saved = read_plan(self.run.storage, self.run.layout)
        rejects = []
        for index, source in enumerate(self.sources):
            if source.kind in ("folder", "prefix") and not self.saved.chunks.get(index):
                rejects.append({"manifest": source.uri, "manifest_line": 0, "id": None, "tenant": None,
                                "field": "source", "reason": f"{source.uri}: no objects found", "row": None,
                                "run_id": self.run.run_id})
        publish_rejects(self.run.storage, self.run.layout, rejects, PLAN_REJECTS)  # no tenant: tenant=_unknown
        return Planned(chunks=[(chunk.id, chunk.uri) for chunk in planned_chunks(self.saved, self.sources)],
                       rejects=len(rejects))

    def input_rows(self, markers: list[ChunkStats]) -> int:
        """Objects listed (companions included); a tar shard's or a file's, as read."""
        rows = {marker.chunk: marker.rows for marker in markers}
        return sum(chunk.objects or rows.get(chunk.id, 0) for chunk in planned_chunks(self.saved, self.sources))


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
    table = read_table(storage, OutputLayout(root).results, hive=True)
    return [] if table is None else table.to_pylist()
