"""A run of a job: plan chunks, validate them (once per run), then run and commit them, exactly once per row.

The driver holds only what is proportional to the number of chunks: the plan, the chunks' states from one
listing of the run's `_chunks/` folder, and their markers at the end. Rows never reach it. Workers validate
and commit chunks themselves and report counts to the run's tally, which the progress line reads.

    plan (reused by a re-run) -> validate + dedup (skipped once complete) -> deploy -> run chunks -> summary

`factory validate` is the first half alone: the same reading and validation, no model replicas.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import structlog

from factory.errors import FactoryError
from factory.io.layout import UNATTRIBUTED, OutputLayout
from factory.io.storage import Storage
from factory.jobs.commit import STAGED_REQUESTS, VALIDATED, publish_rejects
from factory.jobs.durable import check_durable_output
from factory.jobs.dedup import DedupIndex, find_duplicates, shard_count
from factory.jobs.manifests import expand_manifest_uris
from factory.jobs.plan import Chunk, ChunkPlan, load_or_build_plan
from factory.jobs.progress import Progress
from factory.jobs.reuse import reuse_context
from factory.jobs.runs import JobAborted  # noqa: F401 - callers catch it from here, next to run_job
from factory.jobs.runs import (
    MARKER_READERS, budget_stop, chunk_finished, chunk_states, generation_defaults, output_root, read_markers,
    start_tally, worker_failure,
)
from factory.jobs.spec import JobSpec, pin_models
from factory.jobs.summary import (
    ChunkStats, ChunkValidation, RunSummary, ValidationSummary, summarize_run,
)
from factory.jobs.validate import ValidateContext, chunk_keys, duplicate_rejects, reject_row, staged_keys
from factory.routing.tenants import TenantRegistry

log = structlog.get_logger(__name__)

# Reading and validating is CPU work; half a CPU each lets two chunks share a core with the I/O waits.
VALIDATE_CPUS = 0.5
DUPLICATE_CHUNKS_PER_TASK = 16


@dataclass
class Run:
    """One attempt at a run: its plan and where every chunk stands."""

    spec: JobSpec
    run_id: str
    storage: Storage
    layout: OutputLayout
    plan: ChunkPlan
    states: dict[str, set[str]]  # chunk id -> marker names found under _chunks/<chunk>/
    registry: TenantRegistry | None
    started: float
    catalog_sources: frozenset[str] = frozenset()  # the product files among the plan's sources

    @property
    def log(self):
        return log.bind(job=self.spec.name, run_id=self.run_id)

    def context(self, tally) -> ValidateContext:
        ctx = ValidateContext(
            run_id=self.run_id, layout=self.layout, storage=self.storage, defaults=generation_defaults(self.spec),
            shards=1, registry=self.registry, tally=tally, catalog=self.spec.catalog,
            catalog_sources=self.catalog_sources, input_roots=tuple(self.spec.input_roots),
        )
        return replace(ctx, shards=shard_count(sum(ctx.expected_rows(chunk) for chunk in self.plan.chunks)))


def open_run(spec: JobSpec, run_id: str | None) -> Run:
    """Plan the inputs (or reuse this run's plan) and read where every chunk stands, in one listing."""
    check_durable_output(spec.output)
    started = time.monotonic()
    run_id = run_id or spec.name
    storage = Storage()
    layout = OutputLayout(output_root(spec, run_id))
    manifests = expand_manifest_uris(spec.inputs, storage)
    products = expand_manifest_uris(spec.catalog.products, storage) if spec.catalog is not None else []
    manifests += products
    plan = load_or_build_plan(manifests, storage, spec.chunk_rows, layout.plan)
    if plan.problems:
        rejects = [reject_row(run_id, problem.source, 0, "manifest", problem.reason) for problem in plan.problems]
        publish_rejects(storage, layout, rejects, "plan")  # no tenant: rejects/tenant=_unknown/
    registry = TenantRegistry.from_file(spec.tenants) if spec.tenants else None
    return Run(spec=spec, run_id=run_id, storage=storage, layout=layout, plan=plan,
               states=chunk_states(storage, layout), registry=registry, started=started,
               catalog_sources=frozenset(products))


def ensure_validated(run: Run, tally, progress: Progress) -> DedupIndex:
    """Every chunk validated and every duplicate id known: done once per run, then read back from its index."""
    if run.storage.exists(run.layout.dedup_index):
        return DedupIndex.model_validate_json(run.storage.read_bytes(run.layout.dedup_index))
    import ray

    ctx = run.context(tally)
    index = DedupIndex(shards=ctx.shards)
    chunks = run.plan.chunks
    if chunks:
        progress.phase("validating", sum(chunk.rows for chunk in chunks), "validated_rows")
        keys = _keys(run, ctx, tally)
        found = keys.groupby("shard", num_partitions=_shuffle_partitions(ctx.shards)).map_groups(
            find_duplicates, batch_format="pyarrow", num_cpus=VALIDATE_CPUS,
            fn_kwargs={"chunks": [(chunk.id, chunk.source) for chunk in chunks], "layout": run.layout,
                       "storage": run.storage},
        )
        started = time.monotonic()
        for row in _worker_rows(found, run):
            index.chunks.setdefault(row["chunk"], []).append(int(row["shard"]))
        run.log.info("chunks validated and duplicate ids found", chunks=len(chunks), shards=ctx.shards,
                     seconds=round(time.monotonic() - started, 1))
        if index.chunks:
            started = time.monotonic()
            by_id = {chunk.id: chunk for chunk in chunks}
            # A duplicate chunk's work is small (its few repeated rows): several chunks per task.
            written = ray.data.from_items(
                [{"chunk": by_id[chunk_id].model_dump_json()} for chunk_id in sorted(index.chunks)],
                override_num_blocks=max(1, -(-len(index.chunks) // DUPLICATE_CHUNKS_PER_TASK)),
            ).map_batches(duplicate_rejects, batch_size=None, fn_kwargs={"ctx": ctx, "index": index},
                          batch_format="numpy", num_cpus=VALIDATE_CPUS)
            for row in _worker_rows(written, run):
                removed = ChunkValidation.model_validate_json(row["removed"])
                index.removed[removed.chunk] = removed
            run.log.info("duplicates rejected", chunks=len(index.chunks), rows=sum(
                removed.requests for removed in index.removed.values()), seconds=round(time.monotonic() - started, 1))
    run.storage.write_bytes(run.layout.dedup_index, index.model_dump_json().encode())
    return index


def _shuffle_partitions(shards: int) -> int:
    """Ray's shuffle runs an aggregating actor per partition (its default is 200): one per CPU of the cluster is
    enough to keep it busy. A partition's shards reach the duplicate finder one group at a time."""
    import ray

    return max(1, min(shards, int(ray.cluster_resources().get("CPU", 1))))


def _keys(run: Run, ctx: ValidateContext, tally):
    """Every valid row's key: from validating the chunks not validated yet, and from the staged requests of the
    chunks an earlier attempt validated (read back as columns, not from the manifests)."""
    import ray

    fresh = [chunk for chunk in run.plan.chunks if VALIDATED not in run.states.get(chunk.id, ())]
    done = [chunk for chunk in run.plan.chunks if VALIDATED in run.states.get(chunk.id, ())]
    branches = []
    if fresh:
        branches.append(ray.data.from_items(
            [{"chunk": chunk.model_dump_json()} for chunk in fresh], override_num_blocks=len(fresh),
        ).map_batches(chunk_keys, batch_size=1, fn_kwargs={"ctx": ctx}, batch_format="numpy",
                      num_cpus=VALIDATE_CPUS))
    if done:
        filesystem, _ = run.storage.arrow_filesystem(run.layout.root)
        paths = {run.storage.arrow_filesystem(run.layout.chunk_file(chunk.id, STAGED_REQUESTS))[1]: chunk.ordinal
                 for chunk in done}
        branches.append(ray.data.read_parquet(
            list(paths), filesystem=filesystem, columns=["tenant", "id", "line"], include_paths=True,
        ).map_batches(staged_keys, fn_kwargs={"ordinals": paths, "shards": ctx.shards}, batch_format="pyarrow",
                      batch_size=None, num_cpus=VALIDATE_CPUS))
        tally.add.remote({"validated_rows": sum(chunk.rows for chunk in done)})
    return branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]


def _worker_rows(dataset, run: Run):
    """The (small) output rows of a Ray Data stage; a worker's failure becomes one line naming its cause."""
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()
    except FactoryError:
        raise
    except Exception as error:
        raise worker_failure(error, run.spec.name, run.run_id, run.layout.root) from None


# ---- factory run ----------------------------------------------------------------------------------------


def run_job(spec: JobSpec, run_id: str | None = None, address: str | None = None, show_progress: bool = True,
            retry_failed: bool | None = None) -> RunSummary:
    import ray

    from factory.jobs.caller import CallContext, ChunkCaller
    from factory.jobs.cluster import connect, default_app_name, deploy, release, wait_until_ready

    spec = pin_models(spec)  # once per job: replicas, results and reuse keys name the same commits
    if spec.archive is not None:  # image archives: the same road, chunks planned as the sources are listed
        from factory.jobs.archive import run_archive_job

        return run_archive_job(spec, run_id, address=address, show_progress=show_progress, retry_failed=retry_failed)
    run = open_run(spec, run_id)
    retry_failed = spec.retry_failed if retry_failed is None else retry_failed
    if run.storage.exists(run.layout.success):
        run.storage.delete(run.layout.success)  # a resumed run is unfinished until it finishes again
    connect(address)
    tally = start_tally(spec)
    progress = Progress(tally, enabled=show_progress)
    app_name = spec.serve.app_name or default_app_name(spec.name)
    owned = spec.serve.app_name is None
    fresh: dict[str, ChunkStats] = {}
    replica_start = 0.0
    try:
        index = ensure_validated(run, tally, progress)
        pending = [chunk for chunk in run.plan.chunks
                   if not chunk_finished(run.states.get(chunk.id, set()), retry_failed)]
        run.log.info("run starting", chunks=len(run.plan.chunks), pending=len(pending), output=run.layout.root)
        if pending:
            deploying = time.monotonic()
            deploy(spec, app_name, run.registry, owned=owned)
            wait_until_ready(app_name, spec.serve.ready_timeout_s)
            replica_start = time.monotonic() - deploying
            chunks = run.context(tally)
            progress.phase("rows", sum(chunks.expected_rows(chunk) for chunk in pending), "settled", "ok", "blocked",
                           "rejected", "failed")
            ctx = CallContext(
                job=spec.name, chunks=chunks, dedup=index, app_name=app_name, in_flight=spec.in_flight,
                row_timeout_s=spec.row_timeout_s, retry=spec.retry, allow_http=spec.allow_http,
                batch_size=spec.serve.max_batch_size,
                flush_rows=spec.commit.rows, flush_seconds=spec.commit.seconds, adapter_window=spec.adapter_window,
                retry_failed=retry_failed,
                reuse=reuse_context(spec, run.registry, run.storage) if spec.reuse else None,
            )
            dataset = ray.data.from_items(
                [{"chunk": chunk.model_dump_json()} for chunk in pending], override_num_blocks=len(pending)
            ).map_batches(
                ChunkCaller, batch_size=1, fn_constructor_kwargs={"ctx": ctx}, batch_format="numpy", num_cpus=0,
                compute=ray.data.ActorPoolStrategy(size=spec.callers,
                                                   max_concurrent_calls_per_actor=spec.chunks_per_caller),
            )
            try:
                for row in _worker_rows(dataset, run):
                    stats = ChunkStats.model_validate_json(row["stats"])
                    fresh[stats.chunk] = stats
            except FactoryError:
                stop = budget_stop(tally, spec.name, run.run_id, run.layout.root)
                if stop is not None:
                    raise stop from None
                raise
    finally:
        progress.close()
        if owned and not spec.serve.keep_warm:
            release(app_name)

    counts, _ = ray.get(tally.snapshot.remote())
    markers = read_markers(run.storage, run.layout, [(chunk.id, chunk.source) for chunk in run.plan.chunks],
                           run.states, fresh)
    summary = summarize_run(
        markers, job=spec.name, run_id=run.run_id, output=run.layout.root,
        plan_rejects=len(run.plan.problems), rows_read=counts.get("rows_read", 0),
        rows_read_again=counts.get("rows_read_again", 0), model_rows=counts.get("model_rows", 0),
        wall_seconds=time.monotonic() - run.started, replica_start_seconds=replica_start,
    )
    run.storage.write_bytes(run.layout.summary, summary.model_dump_json(indent=2).encode())
    run.storage.write_bytes(run.layout.success, b"")
    run.log.info("run finished", **summary.by_status)
    return summary


# ---- factory validate -------------------------------------------------------------------------------------


def validate_job(spec: JobSpec, run_id: str | None = None, address: str | None = None,
                 show_progress: bool = True) -> ValidationSummary:
    """Read and validate every row as `factory run` would, with no model replicas: counts by tenant, task and
    adapter, every reject written, and an estimate of the model time the run would take."""
    import ray

    from factory.jobs.cluster import connect
    from factory.model.profiles import get_profile

    if spec.archive is not None:
        raise FactoryError(f"job {spec.name}: factory validate checks manifest rows; an archive job has none "
                           "(its bad images become rejected rows when it runs)")
    run = open_run(spec, run_id)
    connect(address)
    tally = start_tally(None)
    progress = Progress(tally, enabled=show_progress)
    try:
        index = ensure_validated(run, tally, progress)
    finally:
        progress.close()

    def read(chunk: Chunk) -> ChunkValidation:
        return ChunkValidation.model_validate_json(
            run.storage.read_bytes(run.layout.chunk_file(chunk.id, VALIDATED))
        )

    total = ChunkValidation(chunk="*")
    with ThreadPoolExecutor(MARKER_READERS) as pool:
        for found in pool.map(read, run.plan.chunks):
            total.merge(found)
    for removed in index.removed.values():
        total.remove(removed)
    counts, _ = ray.get(tally.snapshot.remote())
    cost = get_profile(spec.profile).cost
    generated = total.tasks.get("generate", 0)
    captions, answers = total.tasks.get("caption", 0), total.tasks.get("vqa", 0)
    model_seconds = (
        total.generate_step_megapixels * cost.seconds_per_step_megapixel + captions * cost.seconds_per_caption
        + answers * cost.seconds_per_answer + (generated + captions + answers) * cost.seconds_per_safety_check
    )
    wall = time.monotonic() - run.started
    summary = ValidationSummary(
        job=spec.name, run_id=run.run_id, output=run.layout.root, rows=total.rows_read,
        requests=total.requests, rejects=total.rejects + total.duplicates + len(run.plan.problems),
        duplicates=total.duplicates, unreadable_manifests=len(run.plan.problems), tenants=total.tenants,
        tasks=total.tasks, adapters=total.adapters, reject_fields=total.reject_fields,
        reject_tenants=dict(sorted((Counter(total.reject_tenants) + Counter({UNATTRIBUTED: len(run.plan.problems)})
                                    ).items())),
        model_seconds=round(model_seconds, 1), estimate_basis=f"{spec.profile} on {cost.hardware}: {cost.basis}",
        rows_read=counts.get("rows_read", 0), rows_read_again=counts.get("rows_read_again", 0),
        wall_seconds=round(wall, 2),
        rows_per_second=round(total.rows_read / max(wall, 1e-9), 1),
    )
    run.storage.write_bytes(run.layout.validation, summary.model_dump_json(indent=2).encode())
    return summary
