"""Reading a training data set's chunks on the workers: every captioned image becomes one item, brought to its
resolution bucket; every input that cannot become one is a finished item holding its reject.

Pairing is `factory.jobs.sources.training.pairs`; here an image is decoded and converted by the rules of
`factory.io.images` (a corrupt or oversized image is refused with its reason), fitted to the bucket nearest its
aspect ratio, and handed to the encoder stage as RGB pixels, in the worker thread that reads ahead of the
encoders. An image an earlier attempt already encoded is passed over undecoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from factory.errors import InputError
from factory.io.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, prepare_image
from factory.jobs.engine.source import ChunkInput, ChunkReader, Item, RunContext
from factory.jobs.sources.training.listing import TrainingChunk
from factory.jobs.sources.training.pairs import Pair, Refused, read_pairs
from factory.model.training.buckets import fit_to_bucket, nearest_bucket
from factory.model.training.options import Bucket


@dataclass
class Sample:
    """One captioned image on its way to the encoders: what its latents row says of it, and its pixels."""

    meta: dict  # id, source_uri, caption, image_sha256, bucket_width, bucket_height (factory.model.training.cache)
    pixels: bytes  # RGB, bucket_width x bucket_height

    def image(self) -> Image.Image:
        return Image.frombytes("RGB", (self.meta["bucket_width"], self.meta["bucket_height"]), self.pixels)


class TrainingReader(ChunkReader):
    """The training data set's side on the workers; see the module docstring."""

    chunk_model = TrainingChunk

    def __init__(self, run: RunContext, tenant: str, buckets: list[Bucket], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.run, self.tenant, self.buckets = run, tenant, buckets
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def where(self, chunk: TrainingChunk) -> str:
        return chunk.uri

    def open(self, chunk: TrainingChunk) -> ChunkInput:
        done_counts: dict[str, int] = {}
        return ChunkInput(tenants=[self.tenant], rejects=0, done_counts=done_counts,
                          items=lambda committed: self._items(chunk, committed, done_counts))

    def _items(self, chunk: TrainingChunk, committed_rows: pa.Table, done_counts: dict[str, int]) -> Iterator[Item]:
        """The chunk's samples not committed yet and its rejects, one by one; when it is exhausted, `done_counts`
        settles what the progress line counted for it: its files (a folder's or prefix's names), or, for a shard
        or results file whose size was unknown until read, its items."""
        committed = set(committed_rows["id"].to_pylist())
        samples = refused = 0
        for found in read_pairs(self.run.storage, chunk, self.max_bytes):
            row_id = f"{chunk.source_index}:{found.name}"
            if row_id in committed:
                continue
            item = self._item(chunk, row_id, found)
            if item.row is None:
                samples += 1
            else:
                refused += 1
            yield item
        if chunk.names:
            done_counts.update(settled=len(chunk.names) - len(committed) - samples)
        else:
            done_counts.update(settled=refused, planned=len(committed) + samples + refused)

    def _item(self, chunk: TrainingChunk, row_id: str, found: Pair | Refused) -> Item:
        item = Item(row_id=row_id, tenant=self.tenant)
        if isinstance(found, Refused):
            item.row = self.reject(chunk, row_id, found.field, found.reason)
            return item
        item.digest = hashlib.sha256(found.data).hexdigest()
        try:
            prepared = prepare_image(found.data, found.source_uri, max_pixels=self.max_pixels)
        except InputError as error:
            item.row = self.reject(chunk, row_id, "image", str(error))
            return item
        bucket = nearest_bucket(prepared.image.width, prepared.image.height, self.buckets)
        image = fit_to_bucket(prepared.image, bucket)
        item.data = Sample(meta={"id": row_id, "source_uri": found.source_uri, "caption": found.caption,
                                 "image_sha256": item.digest, "bucket_width": bucket.width,
                                 "bucket_height": bucket.height}, pixels=image.tobytes())
        return item

    def reject(self, chunk: TrainingChunk, row_id: str, field: str, reason: str) -> dict:
        """A reject row (`factory.jobs.engine.commit.REJECT_SCHEMA`) naming the input and why."""
        return {"manifest": chunk.uri, "manifest_line": None, "id": row_id, "tenant": self.tenant, "field": field,
                "reason": reason, "row": None, "run_id": self.run.run_id}
