"""The training data set's model stage: every captioned image encoded once, by Ray Data actors holding only the
profile's VAE and text encoders, its latents committed under the run.

An `EncoderWorker` takes one chunk per call. It reads the chunk's items through the source's reader in a thread
that runs ahead of the encoders (pairing, decoding, bucketing), encodes each image and caption on its own (a
latents row never depends on which images shared its batch), commits latents parts as they fill
(`factory.jobs.training.latents`), publishes the chunk's rejects under `rejects/tenant=<t>/`, and writes the
chunk's marker, with its counts, last. Only counts leave it: to the run's tally as it goes, and the chunk's
counts as its output row. Training (stage 2) then reads the latents instead of running the VAE and the text
encoders at every step (`bench/train.py` measures what that saves).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import structlog

from factory.jobs.engine.commit import publish_rejects, write_marker
from factory.jobs.engine.counts import ChunkStats
from factory.jobs.engine.source import Item, RunContext
from factory.jobs.sources.training.listing import TrainingChunk
from factory.jobs.sources.training.reader import Sample, TrainingReader
from factory.jobs.training.latents import LatentsCommitter, committed_latents
from factory.jobs.training.layout import TrainingLayout
from factory.model.profiles import Profile
from factory.model.training.cache import cache_row
from factory.model.training.encoders import TrainingEncoders

log = structlog.get_logger(__name__)

OK = "ok"


@dataclass(frozen=True)
class EncoderSettings:
    """How the encoder stage runs; shipped to Ray workers."""

    profile: Profile  # pinned: its hub checkpoints at the job's commits
    actors: int
    gpus_per_actor: float
    read_ahead: int  # items read (decoded, bucketed) ahead of the encoders
    flush_rows: int
    flush_seconds: float


def encoded_row(encoders: TrainingEncoders, item: Item) -> dict:
    """A sample's latents row: its VAE latents and its caption's embeddings, with what identifies the image."""
    sample: Sample = item.data
    return cache_row(sample.meta, encoders.encode(sample.image(), sample.meta["caption"]))


def _next_items(items: Iterator[Item], room: int) -> list[Item]:
    return list(islice(items, room))


class EncoderWorker:
    """Ray Data actor UDF: one chunk per call; see the module docstring."""

    def __init__(self, run: RunContext, reader: TrainingReader, settings: EncoderSettings):
        from factory.logs import configure_logging, quiet_library_noise
        from factory.model.stack import resolve_sources

        configure_logging("warning")
        quiet_library_noise()
        self.run, self.reader, self.settings = run, reader, settings
        self.layout = TrainingLayout(run.layout.root)
        source, _, _ = resolve_sources(settings.profile)
        self.encoders = TrainingEncoders.from_pretrained(source, settings.profile.generator)
        self.log = log.bind(job=run.job, run_id=run.run_id, tenant=reader.tenant)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for text in batch["chunk"]:
            stats = await self.process(TrainingChunk.model_validate_json(text))
            out.append(stats.model_dump_json())
        return {"stats": np.array(out, dtype=object)}

    async def process(self, chunk: TrainingChunk) -> ChunkStats:
        """One chunk, top to bottom."""
        run, settings, storage = self.run, self.settings, self.run.storage
        # 1. Open the chunk through its reader; resume: the images earlier attempts encoded stay encoded.
        opened = await asyncio.to_thread(self.reader.open, chunk)
        committed = await asyncio.to_thread(committed_latents, storage, self.layout, chunk.id)
        stats = ChunkStats(chunk=chunk.id)
        for _ in range(committed.num_rows):
            stats.add_result(self.reader.tenant, OK, False, None)
        await run.report({"settled": committed.num_rows})
        latents = LatentsCommitter(storage, self.layout, chunk.id, flush_rows=settings.flush_rows,
                                   flush_seconds=settings.flush_seconds)
        rejects: list[dict] = []
        # 2. Read ahead of the encoders (another thread pairs, decodes and buckets the next items while these are
        #    encoded); commit latents parts as they fill.
        items = opened.items(committed)
        ahead = asyncio.ensure_future(asyncio.to_thread(_next_items, items, settings.read_ahead))
        try:
            while taken := await ahead:
                ahead = asyncio.ensure_future(asyncio.to_thread(_next_items, items, settings.read_ahead))
                rejects += [item.row for item in taken if item.row is not None]
                samples = [item for item in taken if item.row is None]
                for item, row, seconds in await asyncio.to_thread(self._encode, samples):
                    latents.add(row)
                    stats.add_result(item.tenant, OK, False, seconds * 1000)
                if latents.due():
                    await self._flush(latents)
        finally:
            ahead.cancel()
        await self._flush(latents)
        # 3. The rejects, one part per chunk (the same inputs always give the same ones: the first copy stays).
        await asyncio.to_thread(publish_rejects, storage, run.layout, rejects, chunk.id, "rows")
        stats.rejects = len(rejects)
        # 4. The marker: the chunk is finished, with its counts.
        await asyncio.to_thread(write_marker, storage, run.layout, stats)
        await run.report({"chunks": 1, "rows_read": len(rejects) + stats.rows - committed.num_rows,
                          **opened.done_counts})
        self.log.info("chunk encoded", chunk=chunk.id, source=chunk.uri, samples=stats.rows, rejects=len(rejects))
        return stats

    def _encode(self, samples: list[Item]) -> list[tuple[Item, dict, float]]:
        encoded = []
        for item in samples:
            started = time.perf_counter()
            encoded.append((item, encoded_row(self.encoders, item), time.perf_counter() - started))
        return encoded

    async def _flush(self, latents: LatentsCommitter) -> None:
        rows = await asyncio.to_thread(latents.flush)
        if rows:
            await self.run.report({OK: len(rows), "model_rows": len(rows)})


class EncoderStage:
    """The model stage of a training data set: `EncoderWorker` actors, each loading the encoders once. Nothing
    is deployed before the stage (the actors load their models as the pool starts) and nothing is left after it."""

    start_seconds = 0.0  # the encoders load inside the stage, on its actors: counted in the run's wall time

    def __init__(self, settings: EncoderSettings):
        self.settings = settings

    def start(self) -> None:
        """Refuse, in one line, a stage the cluster cannot place (encoders on GPUs it does not have)."""
        from factory.jobs.training.checks import check_gpus

        check_gpus(self.settings.actors if self.settings.gpus_per_actor else 0, "encoding.actors")

    def apply(self, chunks, run: RunContext, reader: TrainingReader):
        """`chunks` through the encoder actors: their stats, one row a chunk."""
        import ray

        return chunks.map_batches(
            EncoderWorker, batch_size=1, batch_format="numpy", num_gpus=self.settings.gpus_per_actor,
            fn_constructor_kwargs={"run": run, "reader": reader, "settings": self.settings},
            # One chunk at a time per actor: its encoders are not shared between threads.
            compute=ray.data.ActorPoolStrategy(size=self.settings.actors, max_concurrent_calls_per_actor=1),
        )

    def stop(self) -> None:
        """Nothing to give back: the actors end with the stage's dataset."""
