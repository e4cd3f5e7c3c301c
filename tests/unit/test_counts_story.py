"""One story of a run's counts in what a person reads: input rows, the rows they became, those rejected before the
model and those that ran by status, the same in the summary line, its table and the progress line."""

from __future__ import annotations

import io

from rich.console import Console

from factory.jobs.engine.counts import ChunkStats
from factory.jobs.report.progress import STATUSES, Progress
from factory.jobs.report.summary import summarize_run
from factory.jobs.report.tables import counts_line, print_summary


def catalog_like():
    """The demo's counts: 34 manifest lines and 5 products, which expand into 7 rows and 2 rejects; 10 rejects
    before the model in all (1 a duplicate id), 33 rows ran, one of them rejected by the model stage."""
    marker = ChunkStats(chunk="c1", rejects=10)
    for index in range(33):
        status = "rejected" if index == 0 else "blocked" if index == 1 else "ok"
        marker.add_result("acme" if index % 2 else "globex", status, has_image=status == "ok" and index < 28,
                          latency_ms=5.0)
    return summarize_run([marker], job="catalog", run_id="catalog", output="out/catalog", plan_rejects=0,
                         rows_read=39, rows_read_again=0, wall_seconds=9.0, input_rows=39)


def test_the_summary_line_tells_input_rows_expanded_rows_rejects_and_what_ran():
    summary = catalog_like()
    assert counts_line(summary) == ("39 input rows became 43 rows: 10 rejected before the model, 33 ran "
                                    "(31 ok, 1 blocked, 1 rejected, 0 failed)")
    # Rows one for one with the input (no catalog, no companions): no "became".
    plain = summary.model_copy(update={"input_rows": 43})
    assert counts_line(plain).startswith("43 input rows: 10 rejected before the model, 33 ran")


def test_the_table_counts_the_rows_that_ran_and_its_footer_matches_the_line():
    summary = catalog_like()
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    footer = next(line for line in lines if line.strip("│ ").startswith("ran"))
    assert footer.split("│")[1:6] == [" ran    ", " 31 ", "       1 ", "        1 ", "      0 "]
    assert lines[-1].startswith(counts_line(summary) + "; 26 images in 9.0 s")


def test_progress_counts_the_rows_that_run_and_an_archive_total_grows_as_it_is_listed():
    # The counts are set as the drawing thread would read them from the run's tally.
    rows = Progress(None, enabled=False)
    rows.phase("rows", 33, "settled", *STATUSES)
    rows.counts = {"validated_rows": 39, "ok": 31, "blocked": 1, "rejected": 1}
    assert rows.line().startswith("rows 33/33 ")
    images = Progress(None, enabled=False)
    images.phase("images", 4, "settled", *STATUSES, grows=True)  # 4 objects planned by an earlier attempt
    images.counts = {"planned": 10, "settled": 2, "ok": 5}
    assert images.line().startswith("images 7/14 ")
