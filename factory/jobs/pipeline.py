"""A run of a job: manifests -> Ray Data -> Serve replicas -> committed results, exactly once per row.

The driver owns only small things: the list of manifest files, the ids already committed (for resume), the
result writer and the progress line. Rows stream through Ray Data with bounded blocks; pixels go from the
replica straight to storage inside the Ray Data worker and never reach the driver.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import structlog

from factory.errors import FactoryError
from factory.jobs.progress import Progress
from factory.jobs.sinks import REJECT_SCHEMA, RESULT_SCHEMA, OutputLayout, PartWriter, read_table
from factory.jobs.stages import REJECT, RESULT, RunContext, source_key
from factory.jobs.storage import Storage, join
from factory.jobs.summary import RunSummary, summarize
from factory.routing.parser import GenerationDefaults

log = structlog.get_logger(__name__)


ROW_BLOCK_BYTES = 16 * 1024


class JobAborted(FactoryError):
    """The error budget ran out; what was committed stays committed."""


@dataclass
class RunState:
    failed: int = 0
    finished: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def output_root(spec, run_id: str) -> str:
    return join(spec.output, run_id)


def generation_defaults(spec) -> GenerationDefaults:
    from factory.model.profiles import get_profile

    profile = get_profile(spec.profile).generator
    given = spec.defaults
    return GenerationDefaults(
        steps=given.steps or profile.steps, width=given.width or profile.width,
        height=given.height or profile.height,
        guidance=given.guidance if given.guidance is not None else profile.guidance,
    )


def load_committed(storage: Storage, layout: OutputLayout) -> tuple[dict[str, str], set[str]]:
    """Rows and rejects that earlier attempts of this run already committed."""
    results = read_table(storage, layout.results, ["id", "manifest", "manifest_line"], hive=True)
    rejects = read_table(storage, layout.rejects, ["manifest", "manifest_line"])
    rows = {} if results is None else {
        row["id"]: source_key(row["manifest"], row["manifest_line"]) for row in results.to_pylist()
    }
    reject_keys = set() if rejects is None else {
        source_key(row["manifest"], row["manifest_line"]) for row in rejects.to_pylist()
    }
    return rows, reject_keys


def count_rows(manifests: list[str], storage: Storage) -> int:
    """For the progress line's total: one streaming pass, nothing kept."""
    from factory.jobs.manifests import iter_manifest_records

    return sum(1 for uri in manifests for _ in iter_manifest_records(uri, storage))


def run_job(spec, run_id: str | None = None, address: str | None = None, show_progress: bool = True) -> RunSummary:
    import ray

    from factory.jobs.cluster import connect, deploy
    from factory.jobs.ledger import RowLedger
    from factory.jobs.manifests import expand_manifest_uris
    from factory.jobs.stages import CallReplicas, order_by_adapter, read_manifests, validate_rows
    from factory.routing.tenants import TenantRegistry

    run_id = run_id or spec.name
    storage = Storage()
    layout = OutputLayout(output_root(spec, run_id))
    run_log = log.bind(job=spec.name, run_id=run_id)
    started = time.monotonic()

    manifests = expand_manifest_uris(spec.inputs, storage)
    total_rows = count_rows(manifests, storage)
    committed_rows, committed_rejects = load_committed(storage, layout)
    if storage.exists(layout.success):
        storage.delete(layout.success)  # a resumed run is unfinished until it finishes again
    run_log.info("run starting", manifests=len(manifests), rows=total_rows, already_committed=len(committed_rows),
                 output=layout.root)

    registry = TenantRegistry.from_file(spec.tenants) if spec.tenants else None
    connect(address)
    app_name = spec.serve.app_name
    deploy(spec, app_name, registry)
    ctx = RunContext(
        job=spec.name, run_id=run_id, layout=layout, storage=storage, defaults=generation_defaults(spec),
        allow_http=spec.allow_http, app_name=app_name, in_flight=spec.in_flight, row_timeout_s=spec.row_timeout_s,
        registry=registry,
    )
    ledger = ray.remote(RowLedger).options(num_cpus=0).remote(committed_rows, committed_rejects)

    # Rows are a few hundred bytes of JSON. With Ray Data's default 128 MiB blocks a whole manifest would be
    # one block, and results would reach the driver (and be committed) only when all of it was done; small
    # blocks stream them back as they finish, and bound what a crash can lose.
    ray.data.DataContext.get_current().target_max_block_size = ROW_BLOCK_BYTES
    dataset = (
        ray.data.from_items([{"uri": uri} for uri in manifests], override_num_blocks=max(1, len(manifests)))
        .map_batches(read_manifests, batch_size=1, fn_kwargs={"ctx": ctx}, num_cpus=0.25)
        .map_batches(validate_rows, batch_size=spec.batch_size * 4, fn_kwargs={"ctx": ctx, "ledger": ledger},
                     num_cpus=0.25)
        .map_batches(order_by_adapter, batch_size=spec.adapter_window, num_cpus=0.1)
        .map_batches(CallReplicas, batch_size=spec.batch_size, fn_constructor_kwargs={"ctx": ctx},
                     concurrency=spec.callers, num_cpus=0.1)
    )

    cadence = {"flush_rows": spec.commit.rows, "flush_seconds": spec.commit.seconds}
    results = PartWriter(storage, layout.results, RESULT_SCHEMA, run_id, partition_by="tenant", **cadence)
    rejects = PartWriter(storage, layout.rejects, REJECT_SCHEMA, run_id, **cadence)
    state = RunState()
    progress = Progress(total=max(total_rows - len(committed_rows), 0), enabled=show_progress)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for kind, payload in zip(batch["kind"], batch["payload"]):
                row = json.loads(payload)
                if kind == REJECT:
                    rejects.add(row)
                    status = "rejected"
                elif kind == RESULT:
                    row["finished_at"] = _timestamp(row["finished_at"])
                    results.add(row)
                    status = row["status"]
                else:  # pragma: no cover - a stage emitted something unknown: a bug, not bad input
                    raise RuntimeError(f"unexpected row kind {kind!r}")
                state.counts[status] = state.counts.get(status, 0) + 1
                state.failed += status == "failed"
                state.finished += status != "rejected"
                progress.update(state.counts)
            if spec.error_budget.exceeded(state.failed, state.finished):
                raise JobAborted(
                    f"job {spec.name}: {state.failed} of {state.finished} rows failed, over the error budget; "
                    f"stopped, committed rows are kept under {layout.root} (re-run with --run-id {run_id} to resume)"
                )
    finally:
        # Whatever happens, rows that reached the driver are committed.
        results.flush()
        rejects.flush()
        progress.close()

    summary = summarize(storage, layout, run_id=run_id, job=spec.name, wall_seconds=time.monotonic() - started)
    storage.write_bytes(layout.summary, summary.model_dump_json(indent=2).encode())
    storage.write_bytes(layout.success, b"")
    run_log.info("run finished", **summary.by_status)
    return summary


def _timestamp(text: str):
    from datetime import datetime

    return datetime.fromisoformat(text)

