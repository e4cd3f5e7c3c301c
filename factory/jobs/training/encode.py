"""Stage 1: every captioned image encoded once, on Ray Data.

    units (planned on the driver) ─► read tasks: pair, decode, bucket; rejects committed ─► encoder actors
    (VAE + text encoders only) ─► Parquet shards under OUTPUT/<run>/cache/<attempt>/ ─► cache/dataset.json

Training then reads latents and embeddings from the cache instead of running the VAE and the text encoders at
every step (`bench/train.py` measures what that saves). `dataset.json` is written last: a run that finds it
skips this stage; an attempt that died before it leaves a shard folder nobody reads.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import structlog
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError, InputError
from factory.io.storage import Storage
from factory.jobs.commit import REJECT_SCHEMA, parquet_bytes, publish_once, read_table
from factory.jobs.training.layout import TrainingLayout
from factory.jobs.training.sources import TrainingUnit, UnitReader, plan_units
from factory.jobs.training.spec import TrainSpec
from factory.logs import quiet_library_noise
from factory.model.profiles import get_profile
from factory.model.stack import resolve_sources
from factory.model.training.cache import CACHE_SCHEMA, cache_row
from factory.model.training.data import held_out_digests
from factory.model.training.encoders import EncodedSample, TrainingEncoders
from factory.model.training.options import Bucket

log = structlog.get_logger(__name__)

_NO_CAPTION = "no caption beside it"


class CacheManifest(BaseModel):
    """What stage 1 produced; `cache/dataset.json`."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: str = Field(description="Digest of the sources, profile and buckets the cache was encoded from")
    shards: str = Field(description="The folder of this attempt's Parquet shards")
    samples: int = Field(description="Captioned images encoded")
    rejects: int = Field(description="Images and captions rejected, with reasons under rejects/")
    data_digest: str = Field(description="sha256 over every sample's id, image digest and caption")
    held_out: int = Field(description="Images kept out of training for the held-out loss")
    by_bucket: dict[str, int] = Field(description="Samples per resolution bucket ('<w>x<h>')")
    without_caption: int = Field(description="Images rejected for having no caption beside them")


def buckets_of(spec: TrainSpec) -> list[Bucket]:
    generator = get_profile(spec.profile).generator
    return list(spec.options.buckets or (Bucket(width=generator.width, height=generator.height),))


def cache_fingerprint(spec: TrainSpec) -> str:
    decisive = {"sources": spec.sources, "profile": spec.profile,
                "buckets": [b.model_dump() for b in buckets_of(spec)]}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def read_unit(row: dict[str, Any], *, reader: UnitReader, layout: TrainingLayout, tenant: str,
              run_id: str) -> list[dict[str, Any]]:
    """One unit's samples; its rejects committed under rejects/ (the same unit always finds the same ones, so the
    first copy written stays)."""
    unit = TrainingUnit.model_validate(row)
    samples, rejects = reader.read(unit)
    if rejects:
        rows = [{**reject, "tenant": tenant, "run_id": run_id, "row": None} for reject in rejects]
        publish_once(reader.storage, layout.reject_part(unit.id),
                     parquet_bytes(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)))
    log.info("training unit read", run=run_id, tenant=tenant, unit=unit.id, samples=len(samples),
             rejects=len(rejects))
    return samples


class CacheEncoder:
    """Ray Data actor: the profile's VAE and text encoders, nothing else; pixels and captions in, cache rows out."""

    def __init__(self, profile: str):
        quiet_library_noise()
        resolved = get_profile(profile)
        source, _, _ = resolve_sources(resolved)
        self.encoders = TrainingEncoders.from_pretrained(source, resolved.generator)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            image = Image.frombytes("RGB", (row["bucket_width"], row["bucket_height"]), row["pixels"])
            rows.append(cache_row(row, self.encoders.encode(image, row["caption"])))
        return pa.Table.from_pylist(rows, schema=CACHE_SCHEMA)


def finished_cache(spec: TrainSpec, layout: TrainingLayout, storage: Storage) -> CacheManifest | None:
    """The manifest of the cache an earlier attempt of this run finished, or None."""
    if not storage.exists(layout.cache_manifest):
        return None
    manifest = CacheManifest.model_validate_json(storage.read_bytes(layout.cache_manifest))
    if manifest.fingerprint != cache_fingerprint(spec):
        raise ConfigError(f"{layout.root}: this run's cache was encoded from other sources, profile or buckets; "
                          "use another run id")
    return manifest


def plan(spec: TrainSpec, storage: Storage) -> list[TrainingUnit]:
    """The read units of the spec's sources (names only): a missing source is refused here, before Ray starts."""
    return plan_units(spec.sources, storage, spec.encoding.chunk_images)


def encode_cache(spec: TrainSpec, layout: TrainingLayout, storage: Storage, units: list[TrainingUnit]
                 ) -> CacheManifest:
    """Stage 1: `units` read, paired and encoded into a new cache folder; its manifest written last."""
    import ray.data

    fingerprint = cache_fingerprint(spec)
    reader = UnitReader(storage, buckets_of(spec))
    shards = layout.cache_attempt(f"attempt-{uuid.uuid4().hex[:12]}")
    if units:
        dataset = ray.data.from_items([unit.model_dump() for unit in units], override_num_blocks=len(units))
        dataset = dataset.flat_map(read_unit, fn_kwargs={"reader": reader, "layout": layout, "tenant": spec.tenant,
                                                         "run_id": spec.resolved_run_id})
        dataset = dataset.map_batches(
            CacheEncoder, fn_constructor_kwargs={"profile": spec.profile}, batch_size=spec.encoding.batch_size,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=spec.encoding.actors),
            num_gpus=1 if spec.uses_gpu() else 0,
        )
        filesystem, path = storage.arrow_filesystem(shards)
        dataset.write_parquet(path, filesystem=filesystem)
    manifest = _manifest(spec, storage, layout, fingerprint, shards)
    storage.write_bytes(layout.cache_manifest, manifest.model_dump_json(indent=2).encode())
    return manifest


def _manifest(spec: TrainSpec, storage: Storage, layout: TrainingLayout, fingerprint: str,
              shards: str) -> CacheManifest:
    columns = ["id", "image_sha256", "caption", "bucket_width", "bucket_height"]
    table = read_cache(storage, shards, columns)
    rows = sorted(table.to_pylist(), key=lambda row: row["id"])
    digest = hashlib.sha256()
    by_bucket: dict[str, int] = {}
    for row in rows:
        digest.update(json.dumps([row["id"], row["image_sha256"], row["caption"]]).encode() + b"\n")
        key = f"{row['bucket_width']}x{row['bucket_height']}"
        by_bucket[key] = by_bucket.get(key, 0) + 1
    rejects = read_table(storage, layout.rejects, columns=["reason"])
    reasons = [] if rejects is None else rejects.column("reason").to_pylist()
    held = held_out_digests((row["image_sha256"] for row in rows), spec.options.held_out_fraction)
    return CacheManifest(
        fingerprint=fingerprint, shards=shards, samples=len(rows), rejects=len(reasons), data_digest=digest.hexdigest(),
        held_out=sum(row["image_sha256"] in held for row in rows), by_bucket=dict(sorted(by_bucket.items())),
        without_caption=sum(reason.startswith(_NO_CAPTION) for reason in reasons),
    )


def read_cache(storage: Storage, shards: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of a cache folder (an empty table when stage 1 found nothing to encode)."""
    if not any(True for _ in storage.list_files(shards, suffixes=[".parquet"])):
        return CACHE_SCHEMA.empty_table().select(columns) if columns else CACHE_SCHEMA.empty_table()
    filesystem, path = storage.arrow_filesystem(shards)
    return pds.dataset(path, filesystem=filesystem, format="parquet", schema=CACHE_SCHEMA).to_table(columns=columns)


def check_enough(spec: TrainSpec, manifest: CacheManifest, layout: TrainingLayout) -> None:
    """Refuse, in one line, a cache that cannot make the batches the spec asks for."""
    if manifest.samples == 0:
        if manifest.without_caption:
            raise InputError(f"no captioned images in the sources: {manifest.without_caption} image(s) have no "
                             f".txt, .caption or .json caption beside them (reasons in {layout.rejects})")
        raise InputError(f"no usable captioned images in the sources ({manifest.rejects} rejects, reasons in "
                         f"{layout.rejects})")
    trainable = manifest.samples - manifest.held_out
    if trainable < spec.options.batch_size:
        raise InputError(f"too few images: {manifest.samples} captioned image(s), {manifest.held_out} held out, "
                         f"leave {trainable} to train on, fewer than options.batch_size ({spec.options.batch_size})")


def encode_empty_caption(spec: TrainSpec, layout: TrainingLayout, storage: Storage) -> str | None:
    """The empty caption's embeddings, for caption dropout (written once per run); None when not needed."""
    import ray

    if spec.options.caption_dropout <= 0:
        return None
    if not storage.exists(layout.empty_caption):
        encode = ray.remote(num_gpus=1 if spec.uses_gpu() else 0)(_empty_caption_row)
        row = ray.get(encode.remote(spec.profile))
        storage.write_bytes(layout.empty_caption, parquet_bytes(pa.Table.from_pylist([row], schema=CACHE_SCHEMA)))
    return layout.empty_caption


def _empty_caption_row(profile: str) -> dict[str, Any]:
    prompt_embeds, pooled = CacheEncoder(profile).encoders.encode_caption("")
    empty = EncodedSample(latents=np.zeros((0,), dtype="<f4"), prompt_embeds=prompt_embeds, pooled_embeds=pooled)
    return cache_row({"id": "", "source_uri": "", "caption": "", "image_sha256": "", "bucket_width": 0,
                      "bucket_height": 0}, empty)
