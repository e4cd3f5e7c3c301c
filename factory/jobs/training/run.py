"""`factory train`'s driver, top to bottom: check the spec against the profile, open (or resume) the run, encode
the captioned images once (stage 1), train the LoRA (stage 2), write the adapter and the run's report, register
the adapter for its tenant.

Everything a person can get wrong is refused before Ray starts where it can be (an unknown target layer, a rank
the transformer cannot hold, a name the registry already gives another file), and before training where it needs
the data (no captions, too few images for the batch).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from factory.errors import ConfigError
from factory.io.storage import Storage, join
from factory.jobs.training.encode import (
    CacheManifest, buckets_of, check_enough, encode_cache, encode_empty_caption, finished_cache, plan, read_cache,
)
from factory.jobs.training.layout import TrainingLayout
from factory.jobs.training.registry import check_name_free, register_adapter
from factory.jobs.training.report import TrainReport, loss_curve_png
from factory.jobs.training.spec import TrainSpec
from factory.jobs.training.train import WorkerJob, train_adapter
from factory.model.profiles import get_profile
from factory.model.stack import model_version, resolve_sources
from factory.model.training.adapter import check_lora_fits, convert_adapter
from factory.model.training.data import held_out_digests
from factory.model.training.loop import Progress

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    report: TrainReport
    layout: TrainingLayout
    registered: bool | None  # None: not asked to register; False: it already was


def check_profile_fit(spec: TrainSpec) -> None:
    """The spec's targets and rank against the profile's transformer, from its config alone (a meta-device
    skeleton: nothing is loaded)."""
    import torch
    from diffusers import FluxTransformer2DModel

    profile = get_profile(spec.profile)
    source, _, _ = resolve_sources(profile)
    config = FluxTransformer2DModel.load_config(source, subfolder="transformer", revision=profile.generator.revision)
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel.from_config(config)
    check_lora_fits(skeleton, spec.options)


def check_gpus(spec: TrainSpec) -> None:
    """A GPU run on a cluster without a GPU per worker would wait forever for its placement group: say so now."""
    import ray

    if not spec.uses_gpu():
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < spec.scaling.workers:
        raise ConfigError(f"scaling: {spec.scaling.workers} GPU worker(s) asked for (profile {spec.profile}), the "
                          f"cluster has {gpus:g} GPU(s); set scaling.use_gpu: false to train on CPUs")


def open_run(spec: TrainSpec, layout: TrainingLayout, storage: Storage) -> None:
    """Record what the run trains; a run id already used for other sources or options is refused."""
    record = json.dumps({"fingerprint": spec.fingerprint, "spec": spec.model_dump(mode="json")}, sort_keys=True,
                        indent=2).encode()
    if storage.put_if_absent(layout.spec, record):
        return
    started = json.loads(storage.read_bytes(layout.spec))
    if started.get("fingerprint") != spec.fingerprint:
        raise ConfigError(f"run {spec.resolved_run_id}: started with other sources, profile or options "
                          f"({layout.spec}); use another run id")


def validation_prompts(spec: TrainSpec, storage: Storage, manifest: CacheManifest) -> list[str]:
    """The spec's prompts, else the captions of the first held-out images (by id)."""
    if spec.options.validation_prompts:
        return list(spec.options.validation_prompts)
    table = read_cache(storage, manifest.shards, ["id", "image_sha256", "caption"])
    rows = sorted(table.to_pylist(), key=lambda row: row["id"])
    held = held_out_digests((row["image_sha256"] for row in rows), spec.options.held_out_fraction)
    return [row["caption"] for row in rows if row["image_sha256"] in held][:spec.options.validation_images]


def run_training(spec: TrainSpec, *, address: str | None = None, register: bool = False) -> TrainingOutcome:
    from factory.jobs.cluster import connect

    storage = Storage()
    run_id = spec.resolved_run_id
    layout = TrainingLayout(join(spec.output, run_id))
    logger = log.bind(run=run_id, tenant=spec.tenant, adapter=spec.adapter)
    check_profile_fit(spec)
    adapter_uri = layout.adapter(spec.adapter)
    if register:
        if spec.registry is None:
            raise ConfigError("--register: the spec names no registry (registry: tenants.yaml)")
        check_name_free(spec.registry, tenant=spec.tenant, adapter=spec.adapter, uri=adapter_uri)
    manifest = finished_cache(spec, layout, storage)
    units = plan(spec, storage) if manifest is None else []
    open_run(spec, layout, storage)
    connect(address)
    check_gpus(spec)

    if manifest is None:
        manifest = encode_cache(spec, layout, storage, units)  # stage 1
    check_enough(spec, manifest, layout)
    prompts = validation_prompts(spec, storage, manifest)
    storage.write_bytes(layout.validation_prompts, json.dumps(prompts, indent=2).encode())
    first = buckets_of(spec)[0]
    job = WorkerJob(
        profile=spec.profile, options=spec.options, shards=manifest.shards,
        empty_caption=encode_empty_caption(spec, layout, storage), root=layout.root,
        endpoint_url=storage.endpoint_url, region=storage.region, prompts=prompts, width=first.width,
        height=first.height, metadata=_static_metadata(spec, manifest),
    )
    with tempfile.TemporaryDirectory(prefix="factory-train-") as folder:
        trained = Path(folder) / "trained.safetensors"
        progress = train_adapter(spec, layout, storage, job, trained)  # stage 2
        written = trained if spec.format == "diffusers" else convert_adapter(
            trained, Path(folder) / "kohya.safetensors", spec.options, spec.format)
        data = written.read_bytes()
    storage.write_bytes(adapter_uri, data)
    sha256 = hashlib.sha256(data).hexdigest()
    report = _train_report(spec, adapter_uri, sha256, manifest, progress, prompts)
    storage.write_bytes(layout.report, report.model_dump_json(indent=2).encode())
    storage.write_bytes(layout.loss_curve, loss_curve_png(progress))
    registered = None
    if register:
        assert spec.registry is not None
        registered = register_adapter(spec.registry, tenant=spec.tenant, adapter=spec.adapter, uri=adapter_uri,
                                      sha256=sha256, region=spec.region)
    logger.info("adapter trained", uri=adapter_uri, sha256=sha256, steps=progress.step, registered=registered)
    return TrainingOutcome(report=report, layout=layout, registered=registered)


def outcome_lines(outcome: TrainingOutcome) -> list[str]:
    """What `factory train` prints."""
    report, layout = outcome.report, outcome.layout
    base, final = report.base_held_out_loss, report.final_held_out_loss
    held = f"held-out loss {base:.4f} (base) -> {final:.4f}" if base is not None and final is not None else \
        "no held-out images"
    lines = [
        f"{report.adapter_uri}  sha256={report.adapter_sha256}",
        f"{report.tenant}/{report.adapter}{' (' + report.region + ')' if report.region else ''}: {report.steps} "
        f"steps on {report.images - report.held_out_images} images, {held}, {report.rejects} rejects",
        f"report {layout.report}  loss curve {layout.loss_curve}",
    ]
    if outcome.registered is not None:
        lines.append("registered" if outcome.registered else "already registered (same file)")
    return lines


def _train_report(spec: TrainSpec, adapter_uri: str, sha256: str, manifest: CacheManifest, progress: Progress,
                  prompts: list[str]) -> TrainReport:
    recent = progress.losses[-10:]
    return TrainReport(
        run_id=spec.resolved_run_id, tenant=spec.tenant, region=spec.region, adapter=spec.adapter,
        adapter_uri=adapter_uri, adapter_sha256=sha256, format=spec.format, profile=spec.profile,
        base_model=_base_model(spec), steps=progress.step, images=manifest.samples,
        held_out_images=manifest.held_out, rejects=manifest.rejects, data_digest=manifest.data_digest,
        base_held_out_loss=progress.held_out.get(0), final_held_out_loss=progress.held_out.get(progress.step),
        final_train_loss=sum(recent) / len(recent), train_seconds=round(progress.seconds, 3),
        losses=progress.losses, held_out={str(step): loss for step, loss in sorted(progress.held_out.items())},
        validation_prompts=prompts, validation_steps=sorted(progress.held_out) if prompts else [],
    )


def _base_model(spec: TrainSpec) -> str:
    generator = get_profile(spec.profile).generator
    return f"{generator.source}@{generator.revision}" if generator.revision else generator.source


def _static_metadata(spec: TrainSpec, manifest: CacheManifest) -> dict[str, str]:
    options = spec.options
    return {
        "base_model": _base_model(spec), "model_version": model_version(get_profile(spec.profile)),
        "profile": spec.profile, "rank": str(options.rank), "alpha": repr(options.lora_alpha),
        "target_modules": ",".join(options.target_modules), "seed": str(options.seed),
        "data_digest": manifest.data_digest, "images": str(manifest.samples - manifest.held_out),
        "timestep_sampling": options.timestep_sampling, "learning_rate": repr(options.learning_rate),
        "batch_size": str(options.batch_size), "buckets": ",".join(f"{b.width}x{b.height}" for b in buckets_of(spec)),
        "tenant": spec.tenant, "region": spec.region or "", "adapter": spec.adapter,
    }
