"""A training data set as a source (a job spec with a `train:` section, or `factory train`): captioned images
whose chunks go through an encoder stage instead of Serve replicas, and whose output, the latents, trains the
tenant's adapter once every chunk is committed.

Planned up front (`listing`): folders and prefixes cut between stems, a tar shard or a results file one chunk,
the plan saved and a changed data set refused on a re-run. No pre-pass: an image is paired, decoded and bucketed
as a worker reads it (`reader`), and a bad one is a reject naming why. The model stage is `encode.EncoderStage`:
the profile's VAE and text encoders in Ray Data actors, latents committed per chunk, a marker per chunk, so a
killed run resumes by chunk and encodes only what no attempt committed. `finish()` then trains, writes, reports
and registers the adapter (`factory.jobs.training.fit`).
"""

from __future__ import annotations

from contextlib import contextmanager

from factory.io.storage import Storage
from factory.jobs.engine.counts import ChunkStats
from factory.jobs.engine.resume import chunk_finished
from factory.jobs.engine.source import Pending, Planned, RunContext, Source
from factory.jobs.sources.training.encode import EncoderSettings, EncoderStage
from factory.jobs.sources.training.listing import TrainingPlan, check_sources, load_or_build_plan
from factory.jobs.sources.training.reader import TrainingReader
from factory.jobs.spec import JobSpec
from factory.jobs.training.checks import check_profile_fit, check_registry, open_run
from factory.jobs.training.fit import fit_adapter
from factory.jobs.training.layout import TrainingLayout
from factory.jobs.training.spec import buckets_of, uses_gpu
from factory.model.profiles import get_profile, with_revisions

READ_AHEAD_FLOOR = 4  # items a worker reads ahead of its encoders, at least


class TrainingSource(Source):
    """Captioned images to train an adapter from; see the module docstring."""

    counts = "files"

    def __init__(self, spec: JobSpec, run: RunContext):
        assert spec.train is not None
        self.spec, self.run, self.train = spec, run, spec.train
        self.profile = with_revisions(get_profile(spec.profile), spec.revisions)  # the job's pinned commits
        self.layout = TrainingLayout(run.layout.root)
        self.plan_: TrainingPlan | None = None

    @classmethod
    def check(cls, spec: JobSpec, root: str) -> None:
        """The targets and rank against the profile's transformer (its config only), the sources' existence and
        kinds, and the registry's entry for the adapter's name: all before Ray starts."""
        assert spec.train is not None
        check_profile_fit(spec)
        check_sources(spec.train.sources, Storage())
        check_registry(spec, root)

    @property
    def chunk_plan(self) -> TrainingPlan:
        assert self.plan_ is not None, "plan() first"
        return self.plan_

    def plan(self) -> None:
        """Record what the run trains (a run id started with other sources, options or weights is refused), then
        the chunks, or this run's saved plan when its sources are unchanged."""
        open_run(self.spec, self.layout, self.run.storage)
        self.plan_ = load_or_build_plan(self.train.sources, self.run.storage, self.train.encoding.chunk_images,
                                        self.run.layout.plan)

    def pending(self, states: dict[str, set[str]], retry_failed: bool) -> Pending:
        """The chunks without a marker, and their files (a shard's or results file's count once it is read)."""
        chunks = [chunk for chunk in self.chunk_plan.chunks
                  if not chunk_finished(states.get(chunk.id, set()), retry_failed)]
        return Pending(work=[{"chunk": chunk.model_dump_json()} for chunk in chunks],
                       rows=sum(len(chunk.names) for chunk in chunks),
                       listed=any(not chunk.names for chunk in chunks))

    @contextmanager
    def stream(self, pending: Pending):
        import ray

        yield ray.data.from_items(pending.work, override_num_blocks=len(pending.work))

    def reader(self) -> TrainingReader:
        return TrainingReader(self.run, self.train.tenant, buckets_of(self.spec))

    def stage(self, retry_failed: bool) -> EncoderStage:
        encoding = self.train.encoding
        return EncoderStage(EncoderSettings(
            profile=self.profile, actors=encoding.actors, gpus_per_actor=1.0 if uses_gpu(self.spec) else 0.0,
            read_ahead=max(READ_AHEAD_FLOOR, encoding.batch_size), flush_rows=self.spec.commit.rows,
            flush_seconds=self.spec.commit.seconds,
        ))

    def planned(self) -> Planned:
        return Planned(chunks=[(chunk.id, chunk.uri) for chunk in self.chunk_plan.chunks], rejects=0)

    def input_rows(self, markers: list[ChunkStats]) -> int:
        """Files listed in folders and prefixes (captions included); a shard's or results file's items, as read."""
        items = {marker.chunk: marker.rows + marker.rejects for marker in markers}
        return sum(len(chunk.names) or items.get(chunk.id, 0) for chunk in self.chunk_plan.chunks)

    def finish(self, markers: list[ChunkStats]) -> None:
        """Stage 2: the adapter trained on Ray Train from the latents, written, reported and registered."""
        fit_adapter(self.spec, self.profile, self.layout, self.run.storage, run_id=self.run.run_id,
                    rejects=sum(marker.rejects for marker in markers))
