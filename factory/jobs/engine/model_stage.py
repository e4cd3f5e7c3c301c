"""The model stage: a chunk's items go to the Serve replicas and its rows are committed by this worker.

A `ChunkWorker` is a Ray Data actor that takes one chunk per call (a few at once), for any source. It reads the
chunk's items through the source, in a worker thread that runs ahead of the model calls, cuts them into batches
of the replicas' batch size that share one adapter (one Serve request and one library call each), keeps at most
`in_flight` requests in flight, commits result parts as rows finish and writes the chunk's marker at the end.
Only counts leave it: to the run's tally as it goes (which answers with a stop when the error budget ran out),
and the chunk's counts as its output row.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import structlog

from factory.jobs.cluster.serve_app import JobApp
from factory.jobs.engine.commit import ChunkCommitter, write_marker
from factory.jobs.engine.counts import ChunkStats
from factory.jobs.engine.replicas import CallPolicy, Replicas
from factory.jobs.engine.resume import resume_chunk, stats_of
from factory.jobs.engine.source import ChunkDuplicates, Item, ReplicaReader, RunContext
from factory.jobs.engine.tally import JobStopped
from factory.jobs.spec import JobSpec
from factory.routing.requests import Status, TaskResult

log = structlog.get_logger(__name__)

# Seconds; diffusion rows on a GPU take seconds, tiny rows on a CPU milliseconds.
LATENCY_BOUNDARIES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]


@dataclass(frozen=True)
class StageSettings:
    """How the model stage runs a chunk; shipped to Ray workers."""

    calls: CallPolicy
    in_flight: int  # requests a worker keeps in flight to the replicas
    batch_size: int  # requests per replica call: the replicas' max_batch_size
    flush_rows: int
    flush_seconds: float
    retry_failed: bool  # rows an earlier attempt left failed run again


class Batcher:
    """Consecutive items cut into batches of at most `size` replica calls that share one adapter (a replica call
    runs one). A batch is handed out as soon as the next item of the same size could not join it."""

    def __init__(self, size: int):
        self.size = size
        self.batch: list[Item] = []
        self.calls = 0

    def add(self, item: Item) -> list[list[Item]]:
        """The batches `item` completes (none, one, or two when it closes one and fills its own)."""
        done = []
        if self.batch and (self.batch[0].adapter != item.adapter or self.calls + item.calls > self.size):
            done.append(self.rest())
        self.batch.append(item)
        self.calls += item.calls
        if self.calls + item.calls > self.size:
            done.append(self.rest())
        return done

    def rest(self) -> list[Item]:
        batch, self.batch, self.calls = self.batch, [], 0
        return batch


class JobMetrics:
    """Ray metrics while a job runs: rows by status, tenant and task, and seconds per row, on Ray's Prometheus
    endpoint."""

    def __init__(self, job: str):
        from ray.util import metrics

        self.job = job
        self.rows = metrics.Counter(
            "factory_rows", description="Rows finished, by status, tenant and task",
            tag_keys=("job", "status", "tenant", "task"),
        )
        self.seconds = metrics.Histogram(
            "factory_row_seconds", description="Wall time per row from request to committed image",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("job", "task"),
        )

    def record(self, result: TaskResult, seconds: float) -> None:
        tags = {"job": self.job, "status": result.status.value, "tenant": result.tenant, "task": result.task.value}
        self.rows.inc(1, tags=tags)
        self.seconds.observe(seconds, tags={"job": self.job, "task": result.task.value})


@dataclass
class _Chunk:
    """One chunk in this worker: its committer, its counts so far, its batches in flight and the items it holds."""

    chunk: Any
    committer: ChunkCommitter
    stats: ChunkStats
    log: Any
    tasks: list[asyncio.Task] = field(default_factory=list)
    held: list[Item] = field(default_factory=list)


def _next_items(items, duplicates: ChunkDuplicates, room: int) -> list[tuple[Item, bool]]:
    """Up to `room` items, each with whether the duplicates policy holds it; fewer at the chunk's end. In a worker
    thread: reading and decoding run here, ahead of the model calls."""
    taken = []
    for item in items:
        taken.append((item, item.row is None and duplicates.hold(item)))
        if len(taken) >= room:
            break
    return taken


class ChunkWorker:
    """Ray Data actor UDF: one chunk per call; see the module docstring."""

    def __init__(self, run: RunContext, reader: ReplicaReader, settings: StageSettings):
        from factory.logs import configure_logging

        configure_logging("warning")
        self.run, self.reader, self.settings = run, reader, settings
        self.replicas = Replicas(settings.calls)
        self.metrics = JobMetrics(run.job)
        self._limit: asyncio.Semaphore | None = None
        self.log = log.bind(job=run.job, run_id=run.run_id)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._limit is None:  # created here: it belongs to the event loop Ray Data runs us on
            self._limit = asyncio.Semaphore(max(1, -(-self.settings.in_flight // self.settings.batch_size)))
        out = []
        for text in batch["chunk"]:
            stats = await self.process(self.reader.chunk_model.model_validate_json(text))
            out.append(stats.model_dump_json())
        return {"stats": np.array(out, dtype=object)}

    async def process(self, chunk: Any) -> ChunkStats:
        """One chunk, top to bottom."""
        run, settings = self.run, self.settings
        # 1. Open the chunk through its source: the tenants it may write, its rejects, its items (lazily).
        opened = await asyncio.to_thread(self.reader.open, chunk)
        # 2. Resume: what earlier attempts committed stays; the `started` marker first, on the first attempt.
        committed: pa.Table = await asyncio.to_thread(
            resume_chunk, run.storage, run.layout, chunk.id, opened.tenants, retry_failed=settings.retry_failed)
        state = _Chunk(
            chunk=chunk, stats=stats_of(chunk.id, committed, opened.rejects),
            committer=ChunkCommitter(run.storage, run.layout, chunk.id, flush_rows=settings.flush_rows,
                                     flush_seconds=settings.flush_seconds),
            log=self.log.bind(chunk=chunk.id, source=self.reader.where(chunk)),
        )
        await run.report({"settled": committed.num_rows})
        items = opened.items(committed)
        batcher = Batcher(settings.batch_size)
        try:
            # 3. Read ahead of the model; a finished row is committed, a copy held, the rest batched and sent.
            while taken := await asyncio.to_thread(_next_items, items, opened.duplicates, batcher.size):
                for item, held in taken:
                    if item.row is not None:
                        state.committer.add(item.row)
                    elif held:
                        state.held.append(item)
                    else:
                        for batch in batcher.add(item):
                            await self._launch(state, batch)
                await self._collect(state, wait=False)
            if batcher.batch:
                await self._launch(state, batcher.rest())
            await self._collect(state, wait=True)
            # 4. Duplicates: rows for the items the policy held, linked to the rows they copy.
            if state.held:
                await self._flush(state)
                await opened.duplicates.link(state.held, state.committer.add,
                                             lambda rest: self._run_themselves(state, rest))
            await self._flush(state)
        finally:
            for task in state.tasks:
                task.cancel()
        # 5. The marker: the chunk is finished, with its counts.
        await asyncio.to_thread(write_marker, run.storage, run.layout, state.stats)
        await run.report({"chunks": 1, **opened.done_counts})
        state.log.info("chunk committed", rows=state.stats.rows, **state.stats.by_status)
        return state.stats

    async def _run_themselves(self, state: _Chunk, items: list[Item]) -> None:
        batcher = Batcher(self.settings.batch_size)
        for item in items:
            for batch in batcher.add(item):
                await self._launch(state, batch)
        if batcher.batch:
            await self._launch(state, batcher.rest())
        await self._collect(state, wait=True)

    async def _launch(self, state: _Chunk, items: list[Item]) -> None:
        assert self._limit is not None
        await self._limit.acquire()  # backpressure: reading runs ahead of the model by at most in_flight requests
        task = asyncio.ensure_future(self._batch(state, items))
        task.add_done_callback(lambda _: self._limit.release())  # type: ignore[union-attr]
        state.tasks.append(task)

    async def _collect(self, state: _Chunk, wait: bool) -> None:
        done = [task for task in state.tasks if wait or task.done()]
        for task in done:
            for row in await task:
                state.committer.add(row)
        state.tasks = [task for task in state.tasks if task not in done]
        if state.committer.due():
            await self._flush(state)

    async def _flush(self, state: _Chunk) -> None:
        if not state.committer.rows:
            return
        rows = await asyncio.to_thread(state.committer.flush)
        state.stats.add_results(rows)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        stop = await self.run.report(counts)
        if stop:
            raise JobStopped(stop)

    async def _batch(self, state: _Chunk, items: list[Item]) -> list[dict]:
        """One replica call for a batch of items that share an adapter; one row per item."""
        started = time.perf_counter()
        prepared = await asyncio.gather(*(self.reader.calls(item) for item in items))
        calls = [call for made in prepared if isinstance(made, list) for call in made]
        answered, attempts = await self.replicas.call(calls, state.log) if calls else ([], 0)
        if calls:
            await self.run.report({"model_rows": sum(isinstance(made, list) for made in prepared)})
        answers = iter(answered)
        rows = []
        for item, made in zip(items, prepared, strict=True):
            results = [next(answers) for _ in made] if isinstance(made, list) else [made]
            row = await self.reader.row(state.chunk, item, results, attempts if isinstance(made, list) else 0)
            self.metrics.record(results[0], time.perf_counter() - started)
            if row["status"] == Status.FAILED.value:
                state.log.info("row failed", tenant=item.tenant, row_id=item.row_id, error=row["error"])
            rows.append(row)
        return rows


class ReplicaStage:
    """The model stage of a job whose rows go to Serve replicas (generation, captions, answers): the job's Serve
    app, deployed (or joined) before the stage and given back after it, and `ChunkWorker` actors calling it. A
    source says which model stage its chunks go through (`Source.stage`); one that holds its models in its own
    actors (encoders for a training data set, say) is another stage with the same three steps."""

    def __init__(self, spec: JobSpec, *, retry_failed: bool, registry=None):
        self.spec, self.registry = spec, registry
        self.app = JobApp(spec)
        self.settings = StageSettings(
            calls=CallPolicy(app_name=self.app.name, row_timeout_s=spec.row_timeout_s, retry=spec.retry),
            in_flight=spec.in_flight, batch_size=spec.serve.max_batch_size, flush_rows=spec.commit.rows,
            flush_seconds=spec.commit.seconds, retry_failed=retry_failed,
        )

    @property
    def start_seconds(self) -> float:
        """Deploying until ready: model load, compile, warm-up."""
        return self.app.start_seconds

    def start(self) -> None:
        """The replicas deployed (or joined) and ready within serve.ready_timeout_s."""
        self.app.deploy(self.registry)

    def apply(self, chunks, run: RunContext, reader: ReplicaReader):
        """`chunks` (a Ray Dataset of chunk descriptors) through the workers: their stats, one row a chunk."""
        import ray

        spec = self.spec
        return chunks.map_batches(
            ChunkWorker, batch_size=1, batch_format="numpy", num_cpus=0,
            fn_constructor_kwargs={"run": run, "reader": reader, "settings": self.settings},
            compute=ray.data.ActorPoolStrategy(size=spec.callers, max_concurrent_calls_per_actor=spec.chunks_per_caller),
        )

    def stop(self) -> None:
        """The replicas given back, if this stage deployed them into the job's own app (see JobApp.release)."""
        self.app.release()
