"""The tables a person reads at the end of a run or a validation."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from factory.jobs.summary import RunSummary, ValidationSummary

STATUSES = ("ok", "blocked", "rejected", "failed")


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    table = Table(title=f"{summary.job} / {summary.run_id}", show_footer=True)
    table.add_column("tenant", footer="all")
    for status in STATUSES:
        table.add_column(status, justify="right", footer=str(summary.by_status.get(status, 0)))
    table.add_column("images", justify="right", footer=str(summary.images))
    table.add_column("compute s", justify="right",
                     footer=f"{sum(t.compute_seconds for t in summary.tenants.values()):.2f}")
    for name, tenant in summary.tenants.items():
        table.add_row(name, *(str(tenant.by_status.get(s, 0)) for s in STATUSES), str(tenant.images),
                      f"{tenant.compute_seconds:.2f}")
    console.print(table)
    started = f", replicas ready after {summary.replica_start_seconds:.1f} s" if summary.replica_start_seconds else ""
    reused = f", {summary.reused} reused from earlier runs" if summary.reused else ""
    console.print(
        f"{summary.rows} rows, {summary.rejects} rejects, {summary.images} images{reused} in "
        f"{summary.wall_seconds:.1f} s{started} ({summary.images_per_second:.2f} images/s); output: {summary.output}",
        soft_wrap=True,
    )


def _counts_table(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title)
    table.add_column(title.split(" ")[-1])
    table.add_column("rows", justify="right")
    for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(name, str(count))
    return table


def print_validation(summary: ValidationSummary, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    for title, counts in (("rows by tenant", summary.tenants), ("rows by task", summary.tasks),
                          ("rows by adapter", summary.adapters), ("rejects by field", summary.reject_fields),
                          ("rejects by tenant", summary.reject_tenants)):
        if counts:
            console.print(_counts_table(title, counts))
    hours = summary.model_seconds / 3600
    console.print(
        f"{summary.rows} input rows: {summary.requests} would run, {summary.rejects} rejects ({summary.duplicates} duplicate "
        f"ids, {summary.unreadable_manifests} unreadable manifests); estimated model time {summary.model_seconds:.0f} s "
        f"({hours:.2f} h) for {summary.estimate_basis}; validated in {summary.wall_seconds:.1f} s "
        f"({summary.rows_per_second:.0f} rows/s); counts under {summary.output}, rejects under "
        f"{summary.output}/rejects/tenant=<tenant>/",
        soft_wrap=True,
    )
