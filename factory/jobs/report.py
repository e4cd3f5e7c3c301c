"""The final summary table a person reads at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from factory.jobs.summary import RunSummary

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
    console.print(
        f"{summary.rows} rows, {summary.rejects} rejects, {summary.images} images in {summary.wall_seconds:.1f} s "
        f"({summary.images_per_second:.2f} images/s); output: {summary.output}",
        soft_wrap=True,
    )
