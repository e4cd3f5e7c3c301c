"""Reusing unchanged images across runs: a nightly run regenerates only what changed.

A generation row's image is a function of its resolved inputs: prompt, seed, size, steps, guidance, the checks
asked of it, the tenant and region (their safety lists apply), the adapter's sha256 and strength, the model
profile with its version and speed options, and the safety policy; an edit row's also of the sha256 of each of its
references' bytes as read, so the same packshot is reused the next night and a changed one (even under the same
name) is made again. Their sha256 is the row's content key. When a
run commits an ok image, it records the key under `OUTPUT/_reuse/<key[:2]>/<key>.json` (beside the runs, shared
by them) with the image's URI and what the row said about it. A later run that finds its row's key there copies
that image into its own run folder instead of calling the model, and its result row names the source in
`reused_from`. A record whose image is gone (an old run deleted) is ignored and replaced. A job that scores its
images (`quality.clip_score`) keys them with its CLIP model too, and a reused row keeps the score its record holds.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

from PIL import Image
from pydantic import BaseModel

from factory.errors import InputError
from factory.io.storage import Storage, join
from factory.jobs.engine.scores import scoring_clip_model
from factory.routing.requests import Status, Task, TaskRequest, TaskResult

REUSE_FOLDER = "_reuse"


@dataclass(frozen=True)
class ReuseContext:
    """What makes an image beyond its row: shipped to the workers with the job's call context."""

    index_root: str  # OUTPUT/_reuse
    profile: str
    model_version: str
    performance: str
    safety: str  # digest of the job's safety policy
    adapters: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (sha256, scale)
    clip_model: str | None = None  # a job that scores its images: the CLIP model its rows' clip_score comes from


class ReuseRecord(BaseModel):
    image_uri: str
    run_id: str
    row_id: str
    model_version: str | None = None
    performance: str | None = None
    adapter_sha256: str | None = None
    checks: dict[str, str] | None = None
    safety_verdict: str | None = None
    safety_decided_by: str | None = None
    safety_labels: list[str] | None = None
    safety_scores: list[float] | None = None
    clip_score: float | None = None


def reuse_index(output: str) -> str:
    return join(output, REUSE_FOLDER)


def content_key(request: TaskRequest, ctx: ReuseContext, reference_sha256: list[str] | None = None) -> str | None:
    """The row's content key, or None for rows that are not reusable (not generation or edit, an edit whose
    references' digests are not known, or an adapter whose file cannot be identified). `reference_sha256`: an edit's
    references' digests (`factory.routing.batch.reference_digests` of the bytes read)."""
    if request.task not in (Task.GENERATE, Task.EDIT) or (request.task is Task.EDIT and not reference_sha256):
        return None
    adapter = None
    if request.adapter is not None:
        if request.adapter not in ctx.adapters:
            return None
        adapter = ctx.adapters[request.adapter]
    inputs = {
        "prompt": request.prompt, "seed": request.seed, "steps": request.steps, "width": request.width,
        "height": request.height, "guidance": request.guidance, "tenant": request.tenant, "region": request.region,
        "checks": [check.model_dump() for check in request.checks], "adapter": adapter, "profile": ctx.profile,
        "model_version": ctx.model_version, "performance": ctx.performance, "safety": ctx.safety,
    }
    if request.task is Task.EDIT:  # only edits carry it: generation rows keep the keys earlier runs recorded
        inputs["edit_references"] = list(reference_sha256 or ())
    if ctx.clip_model is not None:  # as with checks, the row's score is part of what is reused; unscored keys stay
        inputs["clip_model"] = ctx.clip_model
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def record_uri(ctx: ReuseContext, key: str) -> str:
    return join(ctx.index_root, key[:2], f"{key}.json")


def lookup(storage: Storage, ctx: ReuseContext, key: str) -> tuple[ReuseRecord, bytes] | None:
    """The earlier image for this key and its bytes, if its record and its image both still exist."""
    try:
        record = ReuseRecord.model_validate_json(storage.read_bytes(record_uri(ctx, key)))
        return record, storage.read_bytes(record.image_uri)
    except (InputError, ValueError):  # no record, a damaged one, or its image was deleted: generate again
        return None


def reused_result(request: TaskRequest, record: ReuseRecord, image_png: bytes, profile: str,
                  reference_sha256: list[str] | None = None) -> TaskResult:
    """The result of a row whose image an earlier run made from the same inputs (an edit's: its references and
    their digests, which the key held)."""
    width, height = request.width, request.height
    if width is None or height is None:  # an edit sized by its first reference: the size it was made at
        with Image.open(io.BytesIO(image_png)) as image:
            width, height = image.size
    return TaskResult(
        id=request.id, tenant=request.tenant, region=request.region, task=request.task, status=Status.OK,
        prompt=request.prompt, adapter=request.adapter, adapter_sha256=record.adapter_sha256, profile=profile,
        model_version=record.model_version, performance=record.performance, checks=record.checks,
        seed=request.seed, steps=request.steps, width=width, height=height,
        guidance=request.guidance, image_png=image_png, reused_from=record.image_uri,
        reference_uris=list(request.images) if request.images else None, reference_sha256=reference_sha256,
        safety_verdict=record.safety_verdict, safety_decided_by=record.safety_decided_by,
        safety_labels=record.safety_labels, safety_scores=record.safety_scores, clip_score=record.clip_score,
    )


def remember(storage: Storage, ctx: ReuseContext, key: str, result: TaskResult, run_id: str) -> None:
    """Record a freshly generated ok image under its key. The first run to make an image keeps the record,
    unless that record's image is gone, when this one replaces it."""
    record = ReuseRecord(
        image_uri=result.image_uri or "", run_id=run_id, row_id=result.id, model_version=result.model_version,
        performance=result.performance, adapter_sha256=result.adapter_sha256, checks=result.checks,
        safety_verdict=result.safety_verdict, safety_decided_by=result.safety_decided_by,
        safety_labels=result.safety_labels, safety_scores=result.safety_scores, clip_score=result.clip_score,
    )
    uri, data = record_uri(ctx, key), record.model_dump_json().encode()
    if storage.put_if_absent(uri, data):
        return
    try:
        earlier = ReuseRecord.model_validate_json(storage.read_bytes(uri))
        if storage.exists(earlier.image_uri):
            return
    except (InputError, ValueError):
        pass
    storage.write_bytes(uri, data)


def reuse_context(spec, registry, storage: Storage) -> ReuseContext:
    """The job's side of every content key: its profile as its replicas will run it (its speed options, and the
    commits `pin_models` pinned its hub checkpoints to), its safety policy, and the sha256 of each adapter it may
    use (a pinned digest, or the file's, read once here)."""
    from factory.model.profiles import get_profile, with_performance, with_revisions
    from factory.model.stack import model_version

    profile = with_revisions(with_performance(get_profile(spec.profile), spec.performance), spec.revisions)
    adapters = {}
    for ref in registry.adapters() if registry is not None else []:
        try:
            adapters[ref.key] = (ref.sha256 or _file_sha256(storage, ref.uri), ref.scale)
        except InputError:
            continue  # unreadable: its rows are not reused, and the replica rejects them with the reason
    return ReuseContext(
        index_root=reuse_index(spec.output), profile=profile.name, model_version=model_version(profile),
        performance=profile.generator.performance.tag(),
        safety=hashlib.sha256(spec.safety.model_dump_json().encode()).hexdigest(), adapters=adapters,
        clip_model=scoring_clip_model(spec),
    )


def _file_sha256(storage: Storage, uri: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(uri) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
