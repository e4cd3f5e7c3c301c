"""A training run's latents: committed by the encoder stage chunk by chunk, read back whole by the trainer.

A chunk's latents rows (`factory.model.training.cache.CACHE_SCHEMA`: VAE latents and caption embeddings, one row
per image) are committed as whole Parquet parts named by (chunk, writer, sequence), exactly as result rows are
(`factory.jobs.engine.commit`): a part appears whole or not at all and never replaces another, so a resumed chunk
finds the images an earlier attempt encoded with one prefix listing and encodes only the others.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import ChunkCommitter, parquet_bytes, publish, read_parquet_bytes
from factory.jobs.training.layout import TrainingLayout
from factory.model.training.cache import CACHE_SCHEMA


class LatentsCommitter(ChunkCommitter):
    """Buffers one chunk's latents rows and commits them as parts under `cache/latents/` (one table, no tenant
    folders: a training run is one tenant's)."""

    def __init__(self, storage: Storage, layout: TrainingLayout, chunk: str, *, flush_rows: int,
                 flush_seconds: float):
        super().__init__(storage, OutputLayout(layout.root), chunk, flush_rows=flush_rows, flush_seconds=flush_seconds)
        self.latents = layout

    def flush(self) -> list[dict]:
        self.last_flush = time.monotonic()
        rows, self.rows = self.rows, []
        if rows:
            table = pa.Table.from_pylist(rows, schema=CACHE_SCHEMA)
            part = self.latents.latents_part(self.chunk, self.token, self.sequence)
            publish(self.storage, part, parquet_bytes(table))
            self.sequence += 1
        return rows


def committed_latents(storage: Storage, layout: TrainingLayout, chunk: str) -> pa.Table:
    """The ids (and buckets) of the images earlier attempts encoded for `chunk`."""
    columns = ["id", "image_sha256"]
    tables = [read_parquet_bytes(storage.read_bytes(uri)).select(columns)
              for uri in storage.list_prefix(layout.latents_prefix(chunk))]
    return pa.concat_tables(tables) if tables else CACHE_SCHEMA.empty_table().select(columns)


def read_latents(storage: Storage, layout: TrainingLayout, columns: list[str] | None = None) -> pa.Table:
    """Every image's latents row, sorted by id, each id once (a writer Ray Data gave up on may have committed a
    chunk's image as its successor did: the same bytes, since an image is encoded on its own)."""
    wanted = None if columns is None else list(dict.fromkeys(["id", *columns]))
    if not any(True for _ in storage.list_files(layout.latents, suffixes=[".parquet"])):
        table = CACHE_SCHEMA.empty_table().select(wanted or CACHE_SCHEMA.names)
    else:
        filesystem, path = storage.arrow_filesystem(layout.latents)
        dataset = pds.dataset(path, filesystem=filesystem, format="parquet", schema=CACHE_SCHEMA)
        table = dataset.to_table(columns=wanted)
    table = table.sort_by("id")
    if table.num_rows > 1:
        ids = table["id"].combine_chunks()
        first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        table = table.filter(pa.concat_arrays([pa.array([True]), first]))
    return table.select(columns) if columns else table
