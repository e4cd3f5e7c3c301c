"""What a person reads at the end of a run or a validation: one table and one line.

The line tells the run's counts as one story (see `factory.jobs.report.summary`): input rows, the rows they
became, those rejected before the model and those that ran, by status; the table shows the rows that ran, by
tenant.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from factory.jobs.report.quality import figure_cells
from factory.jobs.report.summary import RunSummary, ValidationSummary

STATUSES = ("ok", "blocked", "rejected", "failed")


def counts_line(summary: RunSummary) -> str:
    """`39 input rows became 43 rows: 10 rejected before the model, 33 ran (31 ok, 1 blocked, 1 rejected,
    0 failed)`; "became" only when the rows are not the input rows one for one."""
    rows = summary.rows + summary.rejects
    became = "" if summary.input_rows == rows else f" became {rows} rows"
    statuses = ", ".join(f"{summary.by_status.get(status, 0)} {status}" for status in STATUSES)
    return (f"{summary.input_rows} input rows{became}: {summary.rejects} rejected before the model, "
            f"{summary.rows} ran ({statuses})")


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    table = Table(title=f"{summary.job} / {summary.run_id}", show_footer=True)
    table.add_column("tenant", footer="ran")
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
        f"{counts_line(summary)}; {summary.images} images{reused} in {summary.wall_seconds:.1f} s{started} "
        f"({summary.images_per_second:.2f} images/s); output: {summary.output}",
        soft_wrap=True,
    )
    if summary.quality is not None:  # a run with `quality:`; its groups are in summary.json, intervals in quality.json
        cells = figure_cells(summary.quality.overall) or ["nothing scored"]
        console.print(f"quality: {' · '.join(cells)}; per tenant, region and adapter in summary.json, with "
                      "intervals in quality.json", soft_wrap=True, markup=False)


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
    rows = summary.requests + summary.rejects
    became = "" if summary.rows == rows else f" became {rows} rows"
    console.print(
        f"{summary.rows} input rows{became}: {summary.rejects} rejected before the model ({summary.duplicates} "
        f"duplicate ids, {summary.unreadable_manifests} unreadable manifests), {summary.requests} would run; "
        f"estimated model time {summary.model_seconds:.0f} s ({hours:.2f} h) for {summary.estimate_basis}; validated "
        f"in {summary.wall_seconds:.1f} s ({summary.rows_per_second:.0f} rows/s); counts under {summary.output}, "
        f"rejects under {summary.output}/rejects/tenant=<tenant>/",
        soft_wrap=True,
    )
