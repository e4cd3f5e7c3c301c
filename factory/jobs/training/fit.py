"""Stage 2 of a training run, top to bottom, once the encoder stage committed every chunk: check the data can
make the batches, train the LoRA on Ray Train from the latents, write the adapter and the run's report, register
the adapter for its tenant.

It runs inside the one run driver (`factory.jobs.run.run_job`), as what a training data set's output feeds
(`Source.finish`), so a training run has the driver's resume, markers and summary for its data, and this step
resumes too: Ray Train continues from the run's last checkpoint, and a run whose report is written trains no more
(it registers again if asked, which changes nothing when the adapter is registered already).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import structlog

from factory.errors import InputError
from factory.io.storage import Storage
from factory.jobs.spec import JobSpec
from factory.jobs.training.checks import check_gpus
from factory.jobs.training.data import DataSet, check_enough, data_set, encode_empty_caption, validation_prompts
from factory.jobs.training.figures import TrainReport, loss_curve_png
from factory.jobs.training.layout import TrainingLayout
from factory.jobs.training.registry import register_adapter
from factory.jobs.training.spec import buckets_of, uses_gpu
from factory.jobs.training.train import WorkerJob, train_adapter
from factory.model.profiles import Profile
from factory.model.stack import model_version
from factory.model.training.adapter import convert_adapter
from factory.model.training.loop import Progress

log = structlog.get_logger(__name__)


def fit_adapter(spec: JobSpec, profile: Profile, layout: TrainingLayout, storage: Storage, *, run_id: str,
                rejects: int) -> TrainReport:
    """Train (or find trained) the run's adapter; register it when the spec asks. Returns the run's report.
    `rejects`: the inputs the run's model stage could not use (its summary's)."""
    assert spec.train is not None
    train = spec.train
    logger = log.bind(job=spec.name, run_id=run_id, tenant=train.tenant, adapter=train.adapter)
    report = _finished(storage, layout)
    if report is None:
        # 1. The data: enough images to make the batches (one line, reasons under rejects/, when not).
        data = data_set(storage, layout, train)
        check_enough(train, data, storage, layout.root)
        prompts = validation_prompts(storage, layout, train)
        storage.write_bytes(layout.validation_prompts, json.dumps(prompts, indent=2).encode())
        # 2. Ray Train: the LoRA trained on the latents, from the run's last checkpoint if it has one.
        gpus = uses_gpu(spec)
        check_gpus(train.scaling.workers if gpus else 0, "train.scaling.workers")
        first = buckets_of(spec)[0]
        job = WorkerJob(
            profile=spec.profile, revisions=spec.revisions, options=train.options,
            empty_caption=encode_empty_caption(profile, train, layout, storage, 1.0 if gpus else 0.0),
            root=layout.root, endpoint_url=storage.endpoint_url, region=storage.region, prompts=prompts,
            width=first.width, height=first.height, metadata=_static_metadata(spec, profile, data),
        )
        with tempfile.TemporaryDirectory(prefix="factory-train-") as folder:
            trained = Path(folder) / "trained.safetensors"
            progress = train_adapter(spec, layout, storage, job, trained)
            written = trained if train.format == "diffusers" else convert_adapter(
                trained, Path(folder) / "kohya.safetensors", train.options, train.format)
            adapter = written.read_bytes()
        # 3. The adapter and the run's figures.
        uri = layout.adapter(train.adapter)
        storage.write_bytes(uri, adapter)
        report = _report(spec, profile, run_id, rejects, uri, hashlib.sha256(adapter).hexdigest(), data, progress,
                         prompts)
        storage.write_bytes(layout.loss_curve, loss_curve_png(progress))
        logger.info("adapter trained", uri=uri, sha256=report.adapter_sha256, steps=progress.step)
    # 4. Registered for its tenant (and region), with its sha256, when the spec asks.
    if train.add_to_registry:
        assert spec.tenants is not None  # checked before the run started
        registered = register_adapter(spec.tenants, tenant=train.tenant, adapter=train.adapter,
                                      uri=report.adapter_uri, sha256=report.adapter_sha256, region=train.region)
        report = report.model_copy(update={"registry": spec.tenants, "registered": registered})
        logger.info("adapter registered" if registered else "adapter already registered", registry=spec.tenants)
    storage.write_bytes(layout.report, report.model_dump_json(indent=2).encode())
    return report


def report_lines(report: TrainReport, root: str) -> list[str]:
    """What `factory train` (and `factory run` of a training job) prints after the run's summary."""
    layout = TrainingLayout(root)
    base, final = report.base_held_out_loss, report.final_held_out_loss
    held = f"held-out loss {base:.4f} (base) -> {final:.4f}" if base is not None and final is not None else \
        "no held-out images"
    lines = [
        f"{report.adapter_uri}  sha256={report.adapter_sha256}",
        f"{report.tenant}/{report.adapter}{' (' + report.region + ')' if report.region else ''}: {report.steps} "
        f"steps on {report.images - report.held_out_images} images, {held}, {report.rejects} rejects",
        f"report {layout.report}  loss curve {layout.loss_curve}  (factory report {root})",
    ]
    if report.registered is not None:
        lines.append(f"{'registered in' if report.registered else 'already registered (same file) in'} "
                     f"{report.registry}")
    return lines


def read_report(storage: Storage, root: str) -> TrainReport:
    """A finished training run's report."""
    found = _finished(storage, TrainingLayout(root))
    if found is None:
        raise InputError(f"{root}: no training report (the run has not trained its adapter yet)")
    return found


def _finished(storage: Storage, layout: TrainingLayout) -> TrainReport | None:
    """The report of a run that trained its adapter already (written last, with the adapter before it)."""
    if not storage.exists(layout.report):
        return None
    return TrainReport.model_validate_json(storage.read_bytes(layout.report))


def _report(spec: JobSpec, profile: Profile, run_id: str, rejects: int, uri: str, sha256: str, data: DataSet,
            progress: Progress, prompts: list[str]) -> TrainReport:
    assert spec.train is not None
    train = spec.train
    recent = progress.losses[-10:]
    return TrainReport(
        run_id=run_id, tenant=train.tenant, region=train.region, adapter=train.adapter, adapter_uri=uri,
        adapter_sha256=sha256, format=train.format, profile=spec.profile, base_model=_base_model(profile),
        steps=progress.step, images=data.samples, held_out_images=data.held_out, rejects=rejects,
        data_digest=data.digest, base_held_out_loss=progress.held_out.get(0),
        final_held_out_loss=progress.held_out.get(progress.step), final_train_loss=sum(recent) / len(recent),
        train_seconds=round(progress.seconds, 3), losses=progress.losses,
        held_out={str(step): loss for step, loss in sorted(progress.held_out.items())},
        validation_prompts=prompts, validation_steps=validation_steps(train.options.steps,
                                                                     train.options.validation_every) if prompts else [],
    )


def validation_steps(steps: int, every: int) -> list[int]:
    """The steps whose validation images a run writes (`train.train_worker`): the base model's (0), every
    `every` steps, and the last."""
    return sorted({0, steps, *(range(every, steps, every) if every else ())})


def _base_model(profile: Profile) -> str:
    generator = profile.generator
    return f"{generator.source}@{generator.revision}" if generator.revision else generator.source


def _static_metadata(spec: JobSpec, profile: Profile, data: DataSet) -> dict[str, str]:
    assert spec.train is not None
    train, options = spec.train, spec.train.options
    return {
        "base_model": _base_model(profile), "model_version": model_version(profile), "profile": spec.profile,
        "rank": str(options.rank), "alpha": repr(options.lora_alpha),
        "target_modules": ",".join(options.target_modules),
        "seed": str(options.seed), "data_digest": data.digest, "images": str(data.samples - data.held_out),
        "timestep_sampling": options.timestep_sampling, "learning_rate": repr(options.learning_rate),
        "batch_size": str(options.batch_size), "buckets": ",".join(f"{b.width}x{b.height}" for b in buckets_of(spec)),
        "tenant": train.tenant, "region": train.region or "", "adapter": train.adapter,
    }
