"""A run's quality: its result rows' scores in all and per tenant, region and adapter (`summary.json`'s `quality`),
and with bootstrap intervals, the CLIP model and the tokenizer's limits (`quality.json`).

The rows' own scores were computed as they were made (CLIPScore in the replicas, VQA accuracy and BLEU counts where
the rows were shaped); what only the whole run can give is computed here, once, after the model stage: the group
sums, CIDEr-D (its document frequencies come from every scored caption row's references) and the intervals. The
results are read back batch by batch, only the columns scores need; per row a few numbers are kept, and the tokens
of caption rows with references, which CIDEr-D needs all at once (as pycocoevalcap does). `factory eval` reads a
results folder the same way (`factory.jobs.report.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow.dataset as pds
from pydantic import BaseModel, ConfigDict, Field

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import TENANT_PARTITIONING
from factory.jobs.spec import QualitySpec
from factory.model.lora.ref import BASE_ADAPTER
from factory.quality.bootstrap import Interval
from factory.quality.captions import MAX_N
from factory.quality.groups import BootstrapOptions, GroupDeltas, GroupScores, ScoredRows, ScoreReport, collect, report

# What scoring a results folder reads of each row (those a folder lacks, an older run's, read as absent).
SCORE_COLUMNS = ["id", "tenant", "region", "adapter", "task", "status", "prompt", "caption", "answer", "references",
                 "answers", "clip_score", "vqa_accuracy", "bleu_candidate_length", "bleu_reference_length",
                 "bleu_guesses", "bleu_matches", "image_uri", "profile"]

# The groups of every figure: a tenant; a tenant's region; an adapter (`tenant/name`), or the tenant's base model
# for rows without one (caption and VQA rows never use an adapter).
DIMENSIONS = {
    "tenant": lambda row: row["tenant"],
    "region": lambda row: f"{row['tenant']}/{row['region']}" if row.get("region") else None,
    "adapter": lambda row: row.get("adapter") or f"{row['tenant']}/{BASE_ADAPTER}",
}

NOTES = {
    "tokenizer": "Captions are tokenized as pycocoevalcap's PTBTokenizer does (lowercased, PTB clitics split, its "
    "punctuation dropped) by a Python reimplementation; PTB's rarer rules (its abbreviation list, quotes inside "
    "words) are not reproduced, so BLEU and CIDEr-D of such text can differ slightly from pycocoevalcap's",
    "cider_d": "CIDEr-D's document frequencies come from the references of every scored caption row of the set; a "
    "group's CIDEr-D is the mean of its rows' scores with those frequencies, not pycocoevalcap run on the group alone",
    "bleu": "A group's BLEU-1..4 is the BLEU of its rows' summed n-gram counts (corpus BLEU), not a mean of rows",
    "vqa": "VQAv2 accuracy min(#matching answers / 3, 1) over the ten leave-one-out subsets, after the official answer "
    "normalisation; rows with fewer than four expected answers score by exact match of the normalised answers",
    "meaning": "Scores compare runs, adapters and regions on the same rows; they are not an absolute grade. The tiny "
    "profiles' scores are meaningless by construction (random weights)",
}


class QualityFile(BaseModel):
    """`quality.json`: a run's scores in all and per group, each with its bootstrap interval."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run scored")
    rows: int = Field(description="Result rows read, scored or not")
    scores: ScoreReport = Field(description="Figures in all ('overall') and per tenant, region and adapter")
    clip_model: str | None = Field(
        description="The CLIP model that scored images (org/name@<commit>, the tiny builder's version, or a folder); "
        "None: images were not scored"
    )
    bootstrap: BootstrapOptions = Field(description="How the intervals were drawn")
    notes: dict[str, str] = Field(description="What the figures are, and what they are not")


def result_rows(storage: Storage, results: str, columns: list[str] = SCORE_COLUMNS) -> Iterator[dict[str, Any]]:
    """The rows of a results folder (`results/tenant=<t>/*.parquet`), batch by batch, with those of `columns` it
    has; none where no row was written (a run whose every row was rejected before the model)."""
    if not any(True for _ in storage.list_files(results, suffixes=[".parquet"])):
        return
    filesystem, path = storage.arrow_filesystem(results)
    dataset = pds.dataset(path, filesystem=filesystem, format="parquet", partitioning=TENANT_PARTITIONING)
    present = [name for name in columns if name in dataset.schema.names]
    for batch in dataset.to_batches(columns=present):
        yield from batch.to_pylist()


def switched_off(row: dict[str, Any], quality: QualitySpec) -> dict[str, Any]:
    """The row as the job's switched-off scores leave it: without `captions` its references are kept in the results
    but not scored (no BLEU, no CIDEr-D)."""
    if not quality.clip_score:
        row["clip_score"] = None
    if not quality.vqa:
        row["vqa_accuracy"] = None
    if not quality.captions:
        row["references"] = row["bleu_guesses"] = None
    return row


def scored_rows(rows) -> ScoredRows:
    return collect(rows, DIMENSIONS)


def write_quality(storage: Storage, layout: OutputLayout, run_id: str, quality: QualitySpec,
                  clip_model: str | None) -> ScoreReport:
    """Score the run's results, write `quality.json`, and return the sums (without intervals) for its summary."""
    scored = scored_rows(switched_off(row, quality) for row in result_rows(storage, layout.results))
    document = QualityFile(run_id=run_id, rows=len(scored), scores=report(scored, quality.bootstrap),
                           clip_model=clip_model, bootstrap=quality.bootstrap, notes=NOTES)
    storage.write_bytes(layout.quality, document.model_dump_json(indent=2).encode())
    return report(scored)


# ---- the figures as people read them (the console, the gallery, `factory eval`) ----

# A figure's name (a GroupScores / GroupDeltas field, and a result column except CIDEr-D), label and format.
FIGURES = (("clip_score", "CLIPScore", "{:.2f}"), ("vqa_accuracy", "VQA accuracy", "{:.3f}"),
           ("bleu4", "BLEU-4", "{:.3f}"), ("cider_d", "CIDEr-D", "{:.3f}"))


def figure_cells(scores: GroupScores) -> list[str]:
    """Each figure a group has, with its interval where one was drawn: `CLIPScore 23.41 [22.10, 24.70] (6 rows)`."""
    cells = []
    for name, label, form in FIGURES:
        if name == "bleu4":
            if scores.bleu is not None:
                cells.append(_cell(label, form, scores.bleu.bleu[MAX_N - 1], scores.bleu.bleu4_interval,
                                   scores.bleu.rows))
        elif (figure := getattr(scores, name)) is not None:
            cells.append(_cell(label, form, figure.mean, figure.interval, figure.rows))
    return cells


def delta_cells(deltas: GroupDeltas) -> list[str]:
    """Each score's new - old with its paired interval: `CLIPScore -1.20 [-2.50, +0.10] (5 rows)`."""
    return [_cell(label, "{:+" + form[2:], delta.delta.estimate, delta.delta, delta.delta.rows)
            for name, label, form in FIGURES if (delta := getattr(deltas, name)) is not None]


def row_cells(row: dict[str, Any]) -> list[str]:
    """A result row's own scores: `CLIPScore 23.41`, `VQA accuracy 0.667`, `BLEU-4 0.000`."""
    return [f"{label} {form.format(row[name])}" for name, label, form in FIGURES if row.get(name) is not None]


def _cell(label: str, form: str, value: float, interval: Interval | None, rows: int) -> str:
    bounds = f" [{form.format(interval.low)}, {form.format(interval.high)}]" if interval is not None else ""
    return f"{label} {form.format(value)}{bounds} ({rows} rows)"
