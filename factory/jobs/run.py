"""A run of a job, top to bottom: every source (manifests, a catalog, archives, a training data set) takes this
one road.

The driver holds only what is proportional to the number of chunks: the plan, the chunks' states from one
listing of the run's `_chunks/` folder, and their markers at the end. Rows never reach it: workers validate,
read, call the replicas and commit chunks themselves, and report counts to the run's tally, which the progress
line and the error budget read. What differs between the kinds of input is the source's
(`factory.jobs.engine.source`); the rest is here, once.

    check the job -> join Ray -> plan -> pre-pass (validate, drop repeated ids) -> deploy -> model stage -> summary
    (-> quality, for a job that scores) -> what the output feeds (a training data set's adapter, trained)

`factory validate` is the road up to the pre-pass, for the sources that have one.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import ExitStack

import structlog

from factory.errors import FactoryError
from factory.io.layout import UNATTRIBUTED, OutputLayout
from factory.io.storage import Storage
from factory.jobs.cluster import connect
from factory.jobs.cluster.durable import check_durable_output
from factory.jobs.cluster.nodes import NodeWatch
from factory.jobs.engine.counts import ChunkStats
from factory.jobs.engine.outputs import stage_rows
from factory.jobs.engine.resume import chunk_states, read_markers
from factory.jobs.engine.scores import scoring_clip_model
from factory.jobs.engine.source import RunContext, Source
from factory.jobs.engine.tally import JobAborted, start_tally, tally_counts
from factory.jobs.report.progress import STATUSES, Progress
from factory.jobs.report.quality import write_quality
from factory.jobs.report.summary import RunSummary, ValidationSummary, summarize_run
from factory.jobs.sources.archives.source import ArchiveSource
from factory.jobs.sources.manifests.source import ManifestSource
from factory.jobs.sources.training.source import TrainingSource
from factory.jobs.spec import JobSpec, output_root, pin_models

__all__ = ["JobAborted", "run_job", "validate_job"]

log = structlog.get_logger(__name__)


def source_kind(spec: JobSpec) -> type[Source]:
    """The kind of source a job reads: archives, a training data set, or manifests (a catalog's product files
    among them)."""
    if spec.train is not None:
        return TrainingSource
    return ArchiveSource if spec.archive is not None else ManifestSource


def source_for(spec: JobSpec, run: RunContext) -> Source:
    return source_kind(spec)(spec, run)


def run_job(spec: JobSpec, run_id: str | None = None, address: str | None = None, show_progress: bool = True,
            retry_failed: bool | None = None) -> RunSummary:
    """Run a job, exactly once per row; a re-run of the same run id resumes it."""
    started = time.monotonic()
    # 1. Check the job: its output must outlive it, and its models are pinned to commits once, so its replicas,
    #    results and reuse keys all name the same weights; then what its source can refuse from the spec alone.
    check_durable_output(spec.output)
    spec = pin_models(spec)
    source_kind(spec).check(spec, output_root(spec, run_id or spec.name))
    retry_failed = spec.retry_failed if retry_failed is None else retry_failed
    # 2. Join Ray: a cluster that lets callers in without a token is refused here, before anything is written.
    connect(address)
    tally = start_tally(spec.error_budget)
    run = _run_context(spec, run_id, tally)
    source = source_for(spec, run)
    progress = Progress(tally, enabled=show_progress)
    stage = None
    fresh: dict[str, ChunkStats] = {}
    with ExitStack() as closing:
        closing.callback(progress.close)
        closing.enter_context(NodeWatch(progress.note))  # a node lost meanwhile: one line, its work moves
        # 3. Plan: the source's chunks, each with a deterministic identity (a re-run reads the plan back and
        #    refuses inputs that changed); then where every chunk stands, in one listing. A resumed run is
        #    unfinished until it finishes again.
        source.plan()
        states = chunk_states(run.storage, run.layout)
        if run.storage.exists(run.layout.success):
            run.storage.delete(run.layout.success)
        # 4. The source's pre-pass, if it has one: manifests validate every row once per run and reject repeated
        #    ids in one barrier; archives check each image as the model stage reads it.
        source.prepare(states, progress)
        # 5. The work left: unfinished chunks (and listings to go on with); none, and no model is started.
        pending = source.pending(states, retry_failed)
        log.info("run starting", job=spec.name, run_id=run.run_id, pending=len(pending.work), output=run.layout.root)
        if pending:
            # 6. The source's model stage started: the job's Serve replicas deployed (or joined) and ready within
            #    serve.ready_timeout_s; given back when the run ends, however it ends.
            stage = source.stage(retry_failed)
            closing.callback(stage.stop)
            stage.start()
            # 7. The model stage: chunks stream through its workers, which read each chunk through the source, call
            #    the models in batches, write images and sidecars, and commit result parts and a marker.
            progress.phase(source.counts, pending.rows, "settled", *STATUSES, grows=pending.listed)
            with source.stream(pending) as chunks:
                outputs = stage.apply(chunks, run, source.reader())
                # 8. The error budget: a worker stops once the tally says it ran out, and the run stops with one
                #    line; any other worker failure is one line too. Committed work stays committed either way.
                for row in stage_rows(outputs, job=spec.name, run_id=run.run_id, root=run.layout.root, tally=tally):
                    stats = ChunkStats.model_validate_json(row["stats"])
                    fresh[stats.chunk] = stats
    # 9. The summary: the markers added up (this attempt's from the workers, earlier ones' from storage); then
    #    _SUCCESS, written only when every chunk has its marker.
    counts = tally_counts(tally)
    planned = source.planned()
    markers = read_markers(run.storage, run.layout, planned.chunks, states, fresh)
    summary = summarize_run(
        markers, job=spec.name, run_id=run.run_id, output=run.layout.root, plan_rejects=planned.rejects,
        input_rows=source.input_rows(markers), rows_read=counts.get("rows_read", 0),
        rows_read_again=counts.get("rows_read_again", 0), model_rows=counts.get("model_rows", 0),
        wall_seconds=time.monotonic() - started,
        replica_start_seconds=stage.start_seconds if stage is not None else 0.0,
    )
    if spec.quality is not None:
        # A job that scores: what only the whole run gives (group sums, CIDEr-D, intervals), from its results.
        summary.quality = write_quality(run.storage, run.layout, run.run_id, spec.quality, scoring_clip_model(spec))
    run.storage.write_bytes(run.layout.summary, summary.model_dump_json(indent=2).encode())
    # 10. What the run's output feeds, once every chunk has its marker (a training data set's latents train its
    #     adapter on Ray Train); a re-run that finds every chunk done resumes here. _SUCCESS waits for it.
    source.finish(markers)
    run.storage.write_bytes(run.layout.success, b"")
    log.info("run finished", job=spec.name, run_id=run.run_id, **summary.by_status)
    return summary


def validate_job(spec: JobSpec, run_id: str | None = None, address: str | None = None,
                 show_progress: bool = True) -> ValidationSummary:
    """Read and validate every row as `factory run` would, with no model replicas: counts by tenant, task and
    adapter, every reject written, and an estimate of the model time the run would take. A later run with the
    same run id reuses the validation."""
    from factory.model.profiles import get_profile

    started = time.monotonic()
    if not source_kind(spec).prepass:
        raise FactoryError(f"job {spec.name}: factory validate plans and checks the sources that have a validation "
                           "pre-pass, manifests and catalogs; an archive or training job has none (an image is checked "
                           "as `factory run` reads it, and a bad one is a reject naming why)")
    check_durable_output(spec.output)
    connect(address)
    tally = start_tally(None)
    run = _run_context(spec, run_id, tally)
    source = source_for(spec, run)
    progress = Progress(tally, enabled=show_progress)
    try:
        source.plan()
        source.prepare(chunk_states(run.storage, run.layout), progress)
    finally:
        progress.close()
    total = source.validation()
    counts = tally_counts(tally)
    unreadable = source.planned().rejects
    cost = get_profile(spec.profile).cost
    made = total.tasks.get("generate", 0) + total.tasks.get("edit", 0)
    captions, answers = total.tasks.get("caption", 0), total.tasks.get("vqa", 0)
    # Every made image, caption or answer input and edit reference gets one safety check.
    checked = made + captions + answers + total.references
    model_seconds = (
        (total.generate_step_megapixels + total.edit_step_megapixels) * cost.seconds_per_step_megapixel
        + captions * cost.seconds_per_caption + answers * cost.seconds_per_answer
        + checked * cost.seconds_per_safety_check
    )
    wall = time.monotonic() - started
    summary = ValidationSummary(
        job=spec.name, run_id=run.run_id, output=run.layout.root, rows=total.rows_read,
        requests=total.requests, rejects=total.rejects + total.duplicates + unreadable,
        duplicates=total.duplicates, unreadable_manifests=unreadable, tenants=total.tenants,
        tasks=total.tasks, adapters=total.adapters, reject_fields=total.reject_fields,
        reject_tenants=dict(sorted((Counter(total.reject_tenants) + Counter({UNATTRIBUTED: unreadable})).items())),
        model_seconds=round(model_seconds, 1), estimate_basis=f"{spec.profile} on {cost.hardware}: {cost.basis}",
        rows_read=counts.get("rows_read", 0), rows_read_again=counts.get("rows_read_again", 0),
        wall_seconds=round(wall, 2), rows_per_second=round(total.rows_read / max(wall, 1e-9), 1),
    )
    run.storage.write_bytes(run.layout.validation, summary.model_dump_json(indent=2).encode())
    return summary


def _run_context(spec: JobSpec, run_id: str | None, tally) -> RunContext:
    run_id = run_id or spec.name
    return RunContext(job=spec.name, run_id=run_id, layout=OutputLayout(output_root(spec, run_id)),
                      storage=Storage(), tally=tally)
