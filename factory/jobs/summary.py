"""Counts of a run, per chunk and in all: what the chunk markers hold and the summaries add up.

Every finished chunk leaves a small marker with its counts, so a run's summary is the sum of its markers and a
resumed run reports every attempt's rows without reading a result back. Nothing here holds a row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, Field


def _add(counts: dict[str, int], key: str, amount: int = 1) -> None:
    counts[key] = counts.get(key, 0) + amount


def _merged(left: dict[str, int], right: dict[str, int]) -> dict[str, int]:
    return dict(sorted((Counter(left) + Counter(right)).items()))


class TenantSummary(BaseModel):
    rows: int = 0
    by_status: dict[str, int] = Field(default_factory=dict)
    images: int = 0
    reused: int = Field(default=0, description="Images taken from an earlier run instead of generated")
    compute_seconds: float = Field(default=0.0, description="Model time charged to the tenant (amortised per row)")

    def merge(self, other: TenantSummary) -> None:
        self.rows += other.rows
        self.by_status = _merged(self.by_status, other.by_status)
        self.images += other.images
        self.reused += other.reused
        self.compute_seconds = round(self.compute_seconds + other.compute_seconds, 6)


class ChunkStats(BaseModel):
    """What a finished chunk committed, over all attempts: the content of its marker."""

    chunk: str
    rows: int = 0
    rejects: int = 0
    by_status: dict[str, int] = Field(default_factory=dict)
    tenants: dict[str, TenantSummary] = Field(default_factory=dict)

    def add_result(self, tenant: str, status: str, has_image: bool, latency_ms: float | None,
                   reused: bool = False) -> None:
        self.rows += 1
        _add(self.by_status, status)
        entry = self.tenants.setdefault(tenant, TenantSummary())
        entry.rows += 1
        _add(entry.by_status, status)
        entry.images += has_image
        entry.reused += reused
        entry.compute_seconds += (latency_ms or 0.0) / 1000

    def add_results(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.add_result(row["tenant"], row["status"], row["image_uri"] is not None, row["latency_ms"],
                            row.get("reused_from") is not None)

    def merge(self, other: ChunkStats) -> None:
        self.rows += other.rows
        self.rejects += other.rejects
        self.by_status = _merged(self.by_status, other.by_status)
        for name, tenant in other.tenants.items():
            self.tenants.setdefault(name, TenantSummary()).merge(tenant)


class RunSummary(BaseModel):
    job: str
    run_id: str
    output: str
    rows: int
    rejects: int
    by_status: dict[str, int]
    tenants: dict[str, TenantSummary]
    images: int
    reused: int = Field(default=0, description="Of the images, those reused from an earlier run")
    model_rows: int = Field(default=0, description="Rows this attempt sent to the model replicas")
    chunks: int
    rows_read: int = Field(description="Manifest rows this attempt read (a resumed run reads only unfinished chunks)")
    rows_read_again: int = Field(default=0, description="Of those, rows of chunks an earlier attempt had started")
    wall_seconds: float
    replica_start_seconds: float = Field(
        default=0.0, description="Of the wall time, deploying the replicas until ready (load, compile, warm-up)"
    )
    images_per_second: float
    rows_per_second: float


def summarize_run(markers: Iterable[ChunkStats], *, job: str, run_id: str, output: str, plan_rejects: int,
                  rows_read: int, rows_read_again: int, wall_seconds: float, model_rows: int = 0,
                  replica_start_seconds: float = 0.0) -> RunSummary:
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
        job=job, run_id=run_id, output=output, rows=total.rows, rejects=total.rejects + plan_rejects,
        by_status=total.by_status, tenants=tenants, images=images, chunks=count, rows_read=rows_read,
        reused=sum(tenant.reused for tenant in tenants.values()), model_rows=model_rows,
        rows_read_again=rows_read_again,
        wall_seconds=round(wall_seconds, 2), replica_start_seconds=round(replica_start_seconds, 2),
        images_per_second=round(images / wall, 3),
        rows_per_second=round(total.rows / wall, 3),
    )


class ChunkValidation(BaseModel):
    """What validating one chunk found: the content of its `validated` marker."""

    chunk: str
    rows_read: int = 0
    requests: int = 0
    rejects: int = 0
    duplicates: int = 0
    tenants: dict[str, int] = Field(default_factory=dict)
    tasks: dict[str, int] = Field(default_factory=dict)
    adapters: dict[str, int] = Field(default_factory=dict)
    reject_fields: dict[str, int] = Field(default_factory=dict)
    reject_tenants: dict[str, int] = Field(
        default_factory=dict, description="Rejects (duplicates included) by the tenant folder they went to "
        "(rejects/tenant=<t>/; _unknown for rows of no known tenant)",
    )
    generate_step_megapixels: float = Field(
        default=0.0, description="Sum over generation rows of steps x megapixels: what generation time scales with"
    )
    read_before: bool = Field(default=False, description="An earlier attempt had started reading this chunk")

    def remove(self, other: ChunkValidation) -> None:
        """Take away requests that will not run after all (duplicates of an earlier row)."""
        self.requests -= other.requests
        self.duplicates += other.requests
        for mine, theirs in ((self.tenants, other.tenants), (self.tasks, other.tasks), (self.adapters, other.adapters)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) - count
                if not mine[key]:
                    del mine[key]
        self.reject_tenants = _merged(self.reject_tenants, other.tenants)
        self.generate_step_megapixels -= other.generate_step_megapixels

    def merge(self, other: ChunkValidation) -> None:
        self.rows_read += other.rows_read
        self.requests += other.requests
        self.rejects += other.rejects
        self.duplicates += other.duplicates
        self.tenants = _merged(self.tenants, other.tenants)
        self.tasks = _merged(self.tasks, other.tasks)
        self.adapters = _merged(self.adapters, other.adapters)
        self.reject_fields = _merged(self.reject_fields, other.reject_fields)
        self.reject_tenants = _merged(self.reject_tenants, other.reject_tenants)
        self.generate_step_megapixels += other.generate_step_megapixels


class ValidationSummary(BaseModel):
    job: str
    run_id: str
    output: str
    rows: int = Field(description="Rows in the manifests")
    requests: int = Field(description="Rows that would run (valid, not duplicates)")
    rejects: int
    duplicates: int
    unreadable_manifests: int
    tenants: dict[str, int]
    tasks: dict[str, int]
    adapters: dict[str, int]
    reject_fields: dict[str, int]
    reject_tenants: dict[str, int] = Field(
        default_factory=dict, description="Rejects by tenant folder (rejects/tenant=<t>/), duplicates and "
        "unreadable manifests (_unknown) included",
    )
    model_seconds: float = Field(description="Estimated model time for the requests, from the profile's figures")
    estimate_basis: str
    rows_read: int
    rows_read_again: int = Field(default=0, description="Of rows_read, rows of chunks an earlier attempt had started")
    wall_seconds: float
    rows_per_second: float
