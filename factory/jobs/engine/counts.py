"""What a chunk's markers hold: its counts, as committed (`ChunkStats`) and as validated (`ChunkValidation`).

Every finished chunk leaves a small marker with its counts, so a run's summary is the sum of its markers and a
resumed run reports every attempt's rows without reading a result back. Nothing here holds a row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


def _add(counts: dict[str, int], key: str, amount: int = 1) -> None:
    counts[key] = counts.get(key, 0) + amount


def _merged(left: dict[str, int], right: dict[str, int]) -> dict[str, int]:
    return dict(sorted((Counter(left) + Counter(right)).items()))


class TenantSummary(BaseModel):
    """One tenant's share of a chunk's (or a run's) rows."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(default=0, description="Rows that ran")
    by_status: dict[str, int] = Field(default_factory=dict, description="Those rows by status")
    images: int = Field(default=0, description="Rows whose image was written (image_uri set)")
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

    model_config = ConfigDict(extra="forbid")

    chunk: str = Field(description="The chunk's id")
    rows: int = Field(default=0, description="Rows that ran (its result rows)")
    rejects: int = Field(default=0, description="Its rows rejected before the model stage")
    by_status: dict[str, int] = Field(default_factory=dict, description="Rows that ran, by status")
    tenants: dict[str, TenantSummary] = Field(default_factory=dict, description="Rows that ran, by tenant")

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


class ChunkValidation(BaseModel):
    """What validating one chunk found: the content of its `validated` marker."""

    model_config = ConfigDict(extra="forbid")

    chunk: str = Field(description="The chunk's id ('*' for a sum over chunks)")
    rows_read: int = Field(default=0, description="Input rows read (manifest lines, catalog products)")
    requests: int = Field(default=0, description="Rows that would run: valid, and (once found) not repeated ids")
    rejects: int = Field(default=0, description="Rows rejected by validation")
    duplicates: int = Field(default=0, description="Rows rejected as a repeated id of their tenant")
    tenants: dict[str, int] = Field(default_factory=dict, description="Requests by tenant")
    tasks: dict[str, int] = Field(default_factory=dict, description="Requests by task")
    adapters: dict[str, int] = Field(default_factory=dict, description="Requests by adapter ('base': none)")
    reject_fields: dict[str, int] = Field(default_factory=dict, description="Rejects by the field that failed")
    reject_tenants: dict[str, int] = Field(
        default_factory=dict, description="Rejects (duplicates included) by the tenant folder they went to "
        "(rejects/tenant=<t>/; _unknown for rows of no known tenant)",
    )
    generate_step_megapixels: float = Field(
        default=0.0, description="Sum over generation rows of steps x megapixels: what generation time scales with"
    )
    edit_step_megapixels: float = Field(
        default=0.0, description="Sum over edit rows of steps x megapixels of the output and the references (their "
        "tokens run through every block with the image's): what edit time scales with"
    )
    references: int = Field(default=0, description="Reference images of edit rows (each gets a safety check)")
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
        self.edit_step_megapixels -= other.edit_step_megapixels
        self.references -= other.references

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
        self.edit_step_megapixels += other.edit_step_megapixels
        self.references += other.references
