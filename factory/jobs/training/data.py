"""What stage 2 knows of the data set the encoder stage committed: its counts, its digest, whether it can make
the batches the spec asks for, the validation prompts, and the empty caption's embeddings (caption dropout)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from factory.errors import InputError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import parquet_bytes, read_table
from factory.jobs.spec import TrainSection
from factory.jobs.training.latents import read_latents
from factory.jobs.training.layout import TrainingLayout
from factory.model.profiles import Profile
from factory.model.training.cache import CACHE_SCHEMA, cache_row
from factory.model.training.data import held_out_digests
from factory.model.training.encoders import EncodedSample

NO_CAPTION = "no caption beside it"  # how a reject of an image without a caption begins (its reader says so)


@dataclass(frozen=True)
class DataSet:
    """The encoded data set, as the adapter's header and the report describe it."""

    samples: int  # captioned images encoded
    held_out: int  # of those, kept out of training for the held-out loss
    digest: str  # sha256 over every sample's id, image digest and caption, in id order
    by_bucket: dict[str, int]  # samples per resolution bucket ('<w>x<h>')


def data_set(storage: Storage, layout: TrainingLayout, train: TrainSection) -> DataSet:
    rows = read_latents(storage, layout, ["id", "image_sha256", "caption", "bucket_width", "bucket_height"]).to_pylist()
    digest = hashlib.sha256()
    by_bucket: dict[str, int] = {}
    for row in rows:
        digest.update(json.dumps([row["id"], row["image_sha256"], row["caption"]]).encode() + b"\n")
        key = f"{row['bucket_width']}x{row['bucket_height']}"
        by_bucket[key] = by_bucket.get(key, 0) + 1
    held = held_out_digests((row["image_sha256"] for row in rows), train.options.held_out_fraction)
    return DataSet(samples=len(rows), held_out=sum(row["image_sha256"] in held for row in rows),
                   digest=digest.hexdigest(), by_bucket=dict(sorted(by_bucket.items())))


def check_enough(train: TrainSection, data: DataSet, storage: Storage, root: str) -> None:
    """Refuse, in one line, a data set that cannot make the batches the spec asks for."""
    rejects = OutputLayout(root).rejects
    if data.samples == 0:
        found = read_table(storage, rejects, columns=["reason"])
        reasons = [] if found is None else found.column("reason").to_pylist()
        without = sum(reason.startswith(NO_CAPTION) for reason in reasons)
        if without:
            raise InputError(f"no captioned images in the sources: {without} image(s) have no .txt, .caption or "
                             f".json caption beside them (reasons in {rejects})")
        raise InputError(f"no usable captioned images in the sources ({len(reasons)} rejects, reasons in {rejects})")
    trainable = data.samples - data.held_out
    if trainable < train.options.batch_size:
        raise InputError(f"too few images: {data.samples} captioned image(s), {data.held_out} held out, leave "
                         f"{trainable} to train on, fewer than options.batch_size ({train.options.batch_size})")


def validation_prompts(storage: Storage, layout: TrainingLayout, train: TrainSection) -> list[str]:
    """The spec's prompts, else the captions of the first held-out images (by id)."""
    if train.options.validation_prompts:
        return list(train.options.validation_prompts)
    rows = read_latents(storage, layout, ["image_sha256", "caption"]).to_pylist()
    held = held_out_digests((row["image_sha256"] for row in rows), train.options.held_out_fraction)
    return [row["caption"] for row in rows if row["image_sha256"] in held][:train.options.validation_images]


def encode_empty_caption(profile: Profile, train: TrainSection, layout: TrainingLayout, storage: Storage,
                         gpus: float) -> str | None:
    """The empty caption's embeddings, for caption dropout (written once per run, by a Ray task holding the
    encoders); None when not needed."""
    import ray

    if train.options.caption_dropout <= 0:
        return None
    if not storage.exists(layout.empty_caption):
        row = ray.get(ray.remote(num_gpus=gpus)(_empty_caption_row).remote(profile))
        storage.write_bytes(layout.empty_caption, parquet_bytes(pa.Table.from_pylist([row], schema=CACHE_SCHEMA)))
    return layout.empty_caption


def _empty_caption_row(profile: Profile) -> dict[str, Any]:
    from factory.logs import quiet_library_noise
    from factory.model.stack import resolve_sources
    from factory.model.training.encoders import TrainingEncoders

    quiet_library_noise()
    source, _, _ = resolve_sources(profile)
    prompt_embeds, pooled = TrainingEncoders.from_pretrained(source, profile.generator).encode_caption("")
    empty = EncodedSample(latents=np.zeros((0,), dtype="<f4"), prompt_embeds=prompt_embeds, pooled_embeds=pooled)
    return cache_row({"id": "", "source_uri": "", "caption": "", "image_sha256": "", "bucket_width": 0,
                      "bucket_height": 0}, empty)
