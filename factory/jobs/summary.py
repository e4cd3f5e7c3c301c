"""The run summary, computed from what is committed (so a resumed run reports every attempt's rows)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from factory.jobs.sinks import OutputLayout, read_table
from factory.jobs.storage import Storage


class TenantSummary(BaseModel):
    rows: int
    by_status: dict[str, int]
    images: int
    compute_seconds: float = Field(description="Model time charged to the tenant (amortised per row)")


class RunSummary(BaseModel):
    job: str
    run_id: str
    output: str
    rows: int
    rejects: int
    by_status: dict[str, int]
    tenants: dict[str, TenantSummary]
    images: int
    wall_seconds: float
    images_per_second: float
    rows_per_second: float


def summarize(storage: Storage, layout: OutputLayout, *, run_id: str, job: str, wall_seconds: float) -> RunSummary:
    results = read_table(storage, layout.results, ["tenant", "status", "image_uri", "latency_ms"], hive=True)
    rejects = read_table(storage, layout.rejects, ["manifest"])
    rows = [] if results is None else results.to_pylist()
    by_status: dict[str, int] = {}
    tenants: dict[str, TenantSummary] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        tenant = tenants.setdefault(row["tenant"], TenantSummary(rows=0, by_status={}, images=0, compute_seconds=0.0))
        tenant.rows += 1
        tenant.by_status[row["status"]] = tenant.by_status.get(row["status"], 0) + 1
        tenant.images += row["image_uri"] is not None
        tenant.compute_seconds += (row["latency_ms"] or 0.0) / 1000
    for tenant in tenants.values():
        tenant.compute_seconds = round(tenant.compute_seconds, 3)
    reject_count = 0 if rejects is None else rejects.num_rows
    images = sum(t.images for t in tenants.values())
    wall = max(wall_seconds, 1e-9)
    return RunSummary(
        job=job, run_id=run_id, output=layout.root, rows=len(rows), rejects=reject_count,
        by_status=dict(sorted(by_status.items())), tenants=dict(sorted(tenants.items())), images=images,
        wall_seconds=round(wall_seconds, 2), images_per_second=round(images / wall, 3),
        rows_per_second=round(len(rows) / wall, 3),
    )
