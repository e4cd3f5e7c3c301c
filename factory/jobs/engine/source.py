"""A source: what differs between the kinds of input a job reads, behind the one interface the engine drives.

Manifest files (a catalog's product files among them, expanded by a transform), image archives and a training
data set (captioned images) implement it (`factory.jobs.sources`). The driver (`factory.jobs.run`) and the model
stage do the rest, the same for every source: resume, markers, the tally, the error budget, retries, commits and
the summary. What a source holds is what really differs:

- *Planning.* `Source.plan()` cuts the inputs into chunks with a deterministic identity, saves what a re-run
  needs under `_chunks/`, and refuses inputs that changed since the run began. Manifests are planned up front;
  archives are listed as the run goes (`Source.stream()` yields their chunks as they are listed) and a re-run
  goes on listing from a cursor.
- *A pre-pass* (`Source.prepare()`), an option of the source: manifests validate every row once per run, before
  the model stage, and drop repeated ids in one barrier. Archives have none: an image is checked as it is read.
- *Reading.* On a worker, `ChunkReader.open()` gives a chunk's tenants, what it rejected before the model stage
  and its items, read lazily: the model stage pulls them, ahead of its calls to the replicas.
- *Duplicates.* A policy per chunk (`ChunkInput.duplicates`): during the model stage it may hold an item that
  copies another (archives claim each image's digest), and after the chunk's calls link what it held.
- *Result shaping and sinks.* For a stage of Serve replicas, `ReplicaReader.calls()` says what to ask them for
  an item, and `ReplicaReader.row()` makes the item's one result row of the answers, writing what the row points
  at first (`factory.jobs.engine.writers`).
- *The model stage.* `Source.stage()` names the stage its chunks go through (`ModelStage`): for manifests and
  archives the job's Serve replicas, called by workers (`factory.jobs.engine.model_stage.ReplicaStage`); a
  training data set's holds its encoders in its own actors and commits latents instead of result rows
  (`factory.jobs.sources.training.encode.EncoderStage`).
- *What the output feeds.* `Source.finish()` runs once every chunk has its marker, before `_SUCCESS`: nothing for
  most sources; a training data set's latents train its adapter there (Ray Train), so a run that encoded the
  images and then lost its trainer resumes by training, not by encoding again.
- *Checks before Ray.* `Source.check()` refuses, before the driver joins Ray, what the spec alone shows cannot
  run (a training target layer its profile's transformer does not have).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import pyarrow as pa
from pydantic import BaseModel

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.counts import ChunkStats, ChunkValidation
from factory.routing.batch import ReplicaCall
from factory.routing.requests import TaskResult

if TYPE_CHECKING:
    from factory.jobs.spec import JobSpec


@dataclass(frozen=True)
class RunContext:
    """One attempt at a run, as every stage sees it; shipped to Ray workers."""

    job: str
    run_id: str
    layout: OutputLayout
    storage: Storage
    tally: Any = None  # the run's RunTally actor; None where nothing is counted (tests)

    async def report(self, counts: dict[str, int]) -> str | None:
        """Add to the run's tally; the reason the run must stop (its error budget ran out), or None."""
        return None if self.tally is None else await self.tally.add.remote(counts)


@dataclass
class Item:
    """One row of a chunk in the model stage: either finished already (rejected as it was read), or the replica
    calls it needs, all on one adapter, and what its source makes its row of."""

    row_id: str
    tenant: str
    adapter: str | None = None  # the replicas' multiplexed id: a batch holds items of one adapter
    calls: int = 1  # replica calls its row takes (an archive image with a question takes two)
    row: dict | None = None  # a finished row, committed as it is
    digest: str | None = None  # the sha256 of its input, for a duplicates policy that claims digests
    data: Any = None  # the source's own: a request and its manifest line, a decoded image


class ChunkDuplicates:
    """A source's duplicates policy for one chunk in the model stage. This one holds nothing (manifests: their
    repeated ids were rejected by the barrier of their pre-pass)."""

    def hold(self, item: Item) -> bool:
        """Whether `item` copies another row's input and waits for it (called in a worker thread)."""
        return False

    async def link(self, held: list[Item], commit: Callable[[dict], None],
                   run_themselves: Callable[[list[Item]], Awaitable[None]]) -> None:
        """After the chunk's calls: a row for each held item, from the row it copies (`commit`), or run through
        the model after all (`run_themselves`)."""


@dataclass
class ChunkInput:
    """One chunk, opened on a worker."""

    tenants: list[str]  # the tenant folders its rows may be committed to
    rejects: int  # its rows rejected before the model stage (its marker counts them)
    items: Callable[[pa.Table], Iterator[Item]]  # its items not in the committed rows it is given, lazily
    duplicates: ChunkDuplicates = field(default_factory=ChunkDuplicates)
    done_counts: dict[str, int] = field(default_factory=dict)  # reported to the tally when the chunk is done


class ChunkReader(ABC):
    """A source's side on the workers; shipped to Ray workers, so it holds settings, not connections."""

    chunk_model: ClassVar[type[BaseModel]]  # a chunk as the driver's stream hands it over (JSON)

    @abstractmethod
    def open(self, chunk: Any) -> ChunkInput:
        """The chunk's tenants, rejects and items (called in a worker thread)."""

    @abstractmethod
    def where(self, chunk: Any) -> str:
        """What the chunk reads, for log lines and errors (a manifest, a folder, a shard)."""


class ReplicaReader(ChunkReader):
    """The side of a source whose items go to the job's Serve replicas (`ReplicaStage`): what to ask them for an
    item, and the result row made of their answers."""

    @abstractmethod
    async def calls(self, item: Item) -> list[ReplicaCall] | TaskResult:
        """The replica calls for an item's row, or its result without the model (an unreadable input, an image an
        earlier run made from the same inputs)."""

    @abstractmethod
    async def row(self, chunk: Any, item: Item, results: list[TaskResult], attempts: int) -> dict:
        """The item's result row, from its results (one per call, in order; attempts 0: no model call); what the
        row points at is written first."""


@dataclass(frozen=True)
class Pending:
    """What the model stage has to do this attempt."""

    work: list[dict]  # the stream's input: chunks to run and, for a source listed as it goes, listings to go on
    rows: int  # the rows the progress line counts to (of the chunks planned so far)
    listed: bool = False  # the total grows by the tally's `planned` as the source is listed

    def __bool__(self) -> bool:
        return bool(self.work)


class ModelStage(Protocol):
    """The stage that runs a chunk's items through models and commits its rows: one of possibly several (the job's
    Serve replicas called by workers; encoders held by the workers themselves), the driver does the same with each."""

    start_seconds: float  # starting its models, until ready

    def start(self) -> None:
        """Load or deploy its models; return once they take work."""

    def apply(self, chunks, run: RunContext, reader: ChunkReader):
        """The stage over `chunks`, a Ray Dataset of chunk descriptors: a Dataset of each chunk's `stats` (JSON)."""

    def stop(self) -> None:
        """Give back what `start` took (called however the run ends)."""


@dataclass(frozen=True)
class Planned:
    """A run's plan as it ended."""

    chunks: list[tuple[str, str]]  # (chunk id, what it reads), every chunk of the run
    rejects: int  # inputs rejected whole, each one reject under rejects/tenant=_unknown/


class Source(ABC):
    """A kind of input, on the driver. See the module docstring."""

    prepass: ClassVar[bool] = False  # whether `prepare` checks the inputs before the model stage
    counts: ClassVar[str] = "rows"  # what the progress line counts in the model stage

    @classmethod
    def check(cls, spec: JobSpec, root: str) -> None:
        """Refuse what the spec alone shows cannot run, before the driver joins Ray and before anything is
        written under `root`, the run's output (most sources: nothing to check here)."""

    @abstractmethod
    def plan(self) -> None:
        """Resolve the inputs and plan the run's chunks, or read back this run's plan and refuse inputs that changed
        since it began; what cannot be read at all is a reject (`plan_rejects`)."""

    def prepare(self, states: dict[str, set[str]], progress) -> None:
        """The pre-pass before the model stage, once per run (a re-run reads back what it found), given where
        every chunk stands."""

    @abstractmethod
    def pending(self, states: dict[str, set[str]], retry_failed: bool) -> Pending:
        """The work left, given where every chunk stands (`_chunks/<chunk>/` names, from one listing)."""

    @abstractmethod
    def stream(self, pending: Pending) -> AbstractContextManager:
        """A context giving the pending chunks as a Ray Dataset of `{"chunk": <JSON>}` rows, one chunk a block."""

    @abstractmethod
    def reader(self) -> ChunkReader:
        """The workers' side of this source."""

    @abstractmethod
    def stage(self, retry_failed: bool) -> ModelStage:
        """The model stage its chunks go through (manifests and archives: the job's Serve replicas)."""

    @abstractmethod
    def planned(self) -> Planned:
        """Once the model stage is done: every chunk of the run (a source listed as it went has planned them all
        by then) and the inputs it rejected whole (an unreadable manifest, a source with nothing in it)."""

    @abstractmethod
    def input_rows(self, markers: list[ChunkStats]) -> int:
        """The run's input rows: manifest lines and catalog products; an archive's objects."""

    def finish(self, markers: list[ChunkStats]) -> None:
        """Once every chunk has its marker (`markers`, every chunk's) and the summary is written, before `_SUCCESS`:
        what the run's output feeds (a training data set's latents train its adapter); most sources' output feeds
        nothing here."""

    def validation(self) -> ChunkValidation:
        """What the pre-pass found in every chunk (for `factory validate`); only a source with a pre-pass has it."""
        raise NotImplementedError(f"{type(self).__name__} has no pre-pass")
