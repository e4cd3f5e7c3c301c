"""Stage 2: Ray Train's `TorchTrainer` trains the LoRA from the cache (DDP: NCCL on GPUs, gloo on CPUs).

Each worker reads the run's latents (`cache/latents/`) itself rather than through `ray.train.get_dataset_shard`: the
data order must be a pure function of (seed, step), so that a resumed run continues exactly where the killed one
was and one worker or several train on the same global batches; a streaming split hands each worker whatever
blocks arrive and has no position to resume from. A LoRA data set's cache is small enough for every worker to
hold (tens of kB per image on tiny; ~8 MB with FLUX.1's 512 T5 tokens).

Rank 0 validates (held-out loss; images through the factory's generator with the adapter loaded by the safe
loader) and writes the checkpoint every `checkpoint_every` steps and at the last step; every worker calls
`ray.train.report`, as Ray Train requires. A run started again with the same run id finds its storage
(`OUTPUT/<run id>/checkpoints/`) and `ray.train.get_checkpoint()` hands the workers the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ModelError
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_parquet_bytes
from factory.jobs.spec import JobSpec
from factory.jobs.training.latents import read_latents
from factory.jobs.training.layout import CHECKPOINTS, TrainingLayout, checkpoint_name
from factory.jobs.training.spec import uses_gpu
from factory.logs import quiet_library_noise
from factory.model.profiles import Profile, get_profile, with_revisions
from factory.model.stack import resolve_sources
from factory.model.training.adapter import save_lora
from factory.model.training.cache import read_samples
from factory.model.training.data import split_held_out
from factory.model.training.loop import ADAPTER_FILE, PROGRESS_FILE, Progress, TrainingData, TrainingSession
from factory.model.training.options import TrainOptions
from factory.model.training.validation import Validator
from factory.routing.executor import encode_png

log = structlog.get_logger(__name__)


class WorkerJob(BaseModel):
    """What every training worker is given (Ray Train's train_loop_config)."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field(description="Profile whose transformer is trained")
    revisions: dict[str, str] | None = Field(description="The commits the job pinned its hub checkpoints to")
    options: TrainOptions = Field(description="The spec's training options")
    empty_caption: str | None = Field(description="The empty caption's cache row (caption dropout), or None")
    root: str = Field(description="OUTPUT/<run id>: the latents are read and validation images written there")
    endpoint_url: str | None = Field(description="The driver's S3 endpoint (Storage settings travel with the job)")
    region: str = Field(description="The driver's S3 region")
    prompts: list[str] = Field(description="Validation prompts, in order")
    width: int = Field(description="Validation image width (the first bucket's)")
    height: int = Field(description="Validation image height")
    metadata: dict[str, str] = Field(description="What every adapter file's header says of the run")

    def loaded_profile(self) -> Profile:
        """The profile at the job's pinned commits."""
        return with_revisions(get_profile(self.profile), self.revisions)


def adapter_metadata(job: WorkerJob, progress: Progress) -> dict[str, str]:
    """The run's facts and where training stands: what `factory.*` header entries each adapter file carries."""
    recent = progress.losses[-10:]
    facts = dict(job.metadata, steps=str(progress.step))
    if recent:
        facts["train_loss"] = repr(sum(recent) / len(recent))
    if progress.held_out:
        facts["held_out_loss"] = repr(progress.held_out[max(progress.held_out)])
        if 0 in progress.held_out:
            facts["base_held_out_loss"] = repr(progress.held_out[0])
    return facts


def load_data(storage: Storage, job: WorkerJob) -> TrainingData:
    samples = read_samples(read_latents(storage, TrainingLayout(job.root)))
    train, held_out = split_held_out(samples, job.options.held_out_fraction)
    empty = None
    if job.empty_caption is not None:
        (row,) = read_samples(read_parquet_bytes(storage.read_bytes(job.empty_caption)))
        empty = (row.prompt_embeds, row.pooled_embeds)
    return TrainingData(train=train, held_out=held_out, empty_caption=empty)


class RankZero:
    """What only the first worker does: validation (held-out loss and images) and writing checkpoints."""

    def __init__(self, job: WorkerJob, storage: Storage, source: str):
        self.job, self.storage, self.layout = job, storage, TrainingLayout(job.root)
        profile = job.loaded_profile().generator
        self.validator = Validator(source, profile, job.prompts, width=job.width, height=job.height,
                                   seed=job.options.seed)

    def validate(self, session: TrainingSession) -> None:
        step = session.step
        loss = session.held_out_loss()
        if step == 0:
            images = self.validator.images()
        else:
            with tempfile.TemporaryDirectory() as folder:
                adapter = save_lora(session.transformer, session.options, Path(folder) / ADAPTER_FILE,
                                    adapter_metadata(self.job, session.progress))
                images = self.validator.images(adapter)
        for index, image in enumerate(images):
            self.storage.write_bytes(self.layout.validation_image(step or None, index), encode_png(image))
        log.info("validated", step=step, held_out_loss=loss, images=len(images))


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch

    quiet_library_noise()
    _quiet_report_lines()
    job = WorkerJob.model_validate(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    structlog.contextvars.bind_contextvars(run=Path(job.root).name, tenant=job.metadata.get("tenant"),
                                           adapter=job.metadata.get("adapter"), rank=rank)
    storage = Storage(job.endpoint_url, job.region)
    profile = job.loaded_profile()
    source, _, _ = resolve_sources(profile)
    session = TrainingSession.load(source, profile.generator, job.options, load_data(storage, job),
                                   device=ray.train.torch.get_device(), rank=rank, world=world,
                                   wrap=ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            session.restore(Path(folder))
    first = RankZero(job, storage, source) if rank == 0 else None
    options = job.options
    if first is not None and session.step == 0:
        first.validate(session)  # the base model: held-out loss and images before any step
    while session.step < options.steps:
        session.train_step()
        step, last = session.step, session.step == options.steps
        if first is not None and (last or (options.validation_every and step % options.validation_every == 0)):
            first.validate(session)
        if last or step % options.checkpoint_every == 0:
            _report(session, job, rank)


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs each report at INFO on a logger named after its source file, outside `ray.train`, so
    RunConfig's LoggingConfig does not reach it and every checkpoint would put a line on the console."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _report(session: TrainingSession, job: WorkerJob, rank: int) -> None:
    """Every worker reports; rank 0 with the checkpoint. The upload runs in Ray Train's background thread (which
    deletes the local folder after it), so training goes on instead of waiting for the controller to take the
    report (it polls every 2 s); Ray Train waits for the uploads before the run ends."""
    import ray.train

    progress = session.progress
    metrics = {"step": progress.step, "loss": progress.losses[-1]}
    checkpoint = None
    if rank == 0:
        folder = Path(tempfile.mkdtemp(prefix="factory-checkpoint-"))
        session.save(folder, adapter_metadata(job, progress))
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(progress.step),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def train_adapter(spec: JobSpec, layout: TrainingLayout, storage: Storage, job: WorkerJob,
                  into: Path) -> Progress:
    """Run (or resume) stage 2; copies the last checkpoint's adapter to `into` and returns the run's progress."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    assert spec.train is not None
    scaling = spec.train.scaling
    filesystem, path = storage.arrow_filesystem(layout.root)
    trainer = TorchTrainer(
        train_worker, train_loop_config=job.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=uses_gpu(spec),
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.options.checkpoints_kept),
            failure_config=FailureConfig(max_failures=0),
            # Ray Train's INFO lines (process groups, every checkpoint) would fight factory's console.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        raise ModelError(f"training failed: {_first_cause(error)}") from None
    if result.checkpoint is None:
        raise ModelError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        into.write_bytes((Path(folder) / ADAPTER_FILE).read_bytes())
        return Progress.from_json(json.loads((Path(folder) / PROGRESS_FILE).read_text()))


def _first_cause(error: BaseException) -> str:
    """One line from a worker's failure: its own one-line error when it raised one of factory's."""
    failures = getattr(error, "worker_failures", None) or {}
    cause: BaseException = next(iter(failures.values()), None) or error
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(cause).__name__
