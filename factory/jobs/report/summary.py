"""What a run and a validation add up to: the sum of the chunks' markers, with what the run read and how long.

The counts tell one story, the same in `summary.json`, the summary line and the progress line: a run's input
rows (manifest lines and catalog products; an archive's objects) become rows (a product expands into several);
some are rejected before the model stage (`rejects`, under `rejects/`), the others run and end `ok`, `blocked`,
`rejected` by the model stage (their input could not be used) or `failed` (`rows`, `by_status`, under
`results/`).
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from factory.jobs.engine.counts import ChunkStats, TenantSummary
from factory.quality.groups import ScoreReport


class RunSummary(BaseModel):
    """A run's `summary.json`: its markers added up, and what this attempt read and how long it took."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(description="The job's name")
    run_id: str = Field(description="The run's id")
    output: str = Field(description="Where the run wrote: OUTPUT/<run id>")
    input_rows: int = Field(
        default=0, description="Manifest lines and catalog products of the run (an archive's objects, companions "
        "included); a product expands into several rows")
    rows: int = Field(description="Rows that ran: the result rows, by status in by_status")
    rejects: int = Field(description="Rows rejected before the model stage (rejects/), whole inputs included")
    by_status: dict[str, int] = Field(description="Rows that ran, by status")
    tenants: dict[str, TenantSummary] = Field(description="Rows that ran, by tenant")
    images: int = Field(description="Images written (generated, reused, or an archive's dataset copies)")
    reused: int = Field(default=0, description="Of the images, those reused from an earlier run")
    model_rows: int = Field(default=0, description="Rows this attempt sent to the model replicas")
    chunks: int = Field(description="Chunks of the run, each with its marker")
    rows_read: int = Field(description="Manifest rows this attempt read (a resumed run reads only unfinished chunks)")
    rows_read_again: int = Field(default=0, description="Of those, rows of chunks an earlier attempt had started")
    wall_seconds: float = Field(description="This attempt, from start to summary")
    replica_start_seconds: float = Field(
        default=0.0, description="Of the wall time, deploying the replicas until ready (load, compile, warm-up)"
    )
    images_per_second: float = Field(description="Images over the wall time less the replicas' start")
    rows_per_second: float = Field(description="Rows that ran over the wall time less the replicas' start")
    quality: ScoreReport | None = Field(
        default=None, description="A run with `quality:`: its rows' scores in all and per tenant, region and adapter "
        "(CLIPScore and VQA accuracy as rows, sum and mean; BLEU-1..4 of summed counts; CIDEr-D); with intervals in "
        "quality.json"
    )


def summarize_run(markers: Iterable[ChunkStats], *, job: str, run_id: str, output: str, plan_rejects: int,
                  rows_read: int, rows_read_again: int, wall_seconds: float, model_rows: int = 0,
                  replica_start_seconds: float = 0.0, input_rows: int = 0) -> RunSummary:
    total = ChunkStats(chunk="*")
    count = 0
    for marker in markers:
        total.merge(marker)
        count += 1
    tenants = {name: total.tenants[name] for name in sorted(total.tenants)}
    for tenant in tenants.values():
        tenant.compute_seconds = round(tenant.compute_seconds, 3)
    images = sum(tenant.images for tenant in tenants.values())
    # Rates leave out starting the replicas (model load, compile warm-up): a property of the fleet, not the run.
    wall = max(wall_seconds - replica_start_seconds, 1e-9)
    return RunSummary(
        job=job, run_id=run_id, output=output, input_rows=input_rows, rows=total.rows,
        rejects=total.rejects + plan_rejects,
        by_status=total.by_status, tenants=tenants, images=images, chunks=count, rows_read=rows_read,
        reused=sum(tenant.reused for tenant in tenants.values()), model_rows=model_rows,
        rows_read_again=rows_read_again,
        wall_seconds=round(wall_seconds, 2), replica_start_seconds=round(replica_start_seconds, 2),
        images_per_second=round(images / wall, 3),
        rows_per_second=round(total.rows / wall, 3),
    )


class ValidationSummary(BaseModel):
    """`validation.json`: what `factory validate` found in every chunk, and an estimate of the model time."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(description="The job's name")
    run_id: str = Field(description="The run's id")
    output: str = Field(description="Where the run writes: OUTPUT/<run id>")
    rows: int = Field(description="Rows in the manifests")
    requests: int = Field(description="Rows that would run (valid, not duplicates)")
    rejects: int = Field(description="Rows rejected before the model: invalid, repeated ids, unreadable manifests")
    duplicates: int = Field(description="Of the rejects, repeated ids of their tenant")
    unreadable_manifests: int = Field(description="Of the rejects, manifests that could not be read at all")
    tenants: dict[str, int] = Field(description="Rows that would run, by tenant")
    tasks: dict[str, int] = Field(description="Rows that would run, by task")
    adapters: dict[str, int] = Field(description="Rows that would run, by adapter ('base': none)")
    reject_fields: dict[str, int] = Field(description="Rejects by the field that failed")
    reject_tenants: dict[str, int] = Field(
        default_factory=dict, description="Rejects by tenant folder (rejects/tenant=<t>/), duplicates and "
        "unreadable manifests (_unknown) included",
    )
    model_seconds: float = Field(description="Estimated model time for the requests, from the profile's figures")
    estimate_basis: str = Field(description="The profile and hardware the estimate is for, and its source")
    rows_read: int = Field(description="Input rows this attempt read (a resumed validation reads the rest only)")
    rows_read_again: int = Field(default=0, description="Of rows_read, rows of chunks an earlier attempt had started")
    wall_seconds: float = Field(description="This attempt, from start to summary")
    rows_per_second: float = Field(description="Input rows over the wall time")
