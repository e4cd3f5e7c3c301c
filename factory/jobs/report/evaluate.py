"""`factory eval`: a results folder's scores after the fact, and two folders compared on the rows they share.

Text scores are computed again from the stored columns (each ok answer against its row's `answers`, each ok caption
against its `references`), whatever the run's `quality` section said, so a run made without scores, or with an
older scorer, is scored as today's code scores. CLIPScore: a generated or edited image without a `clip_score` (or
every one, with `clip="all"`, so two runs are compared with the same CLIP model) is scored from its file
(`image_uri`, else `images/<tenant>/<id>.png`) against its prompt, with its profile's CLIP model loaded once in
this process, on first need; an image that cannot be read is counted and named, never guessed.

With `against`, both folders' rows are paired by (tenant, id) and every score's difference is given with its paired
bootstrap interval, in all and per tenant, region and adapter (`factory.quality.groups.compare`); rows only one
folder has are counted and some are named.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import InputError
from factory.io.images import decode_image
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.report.quality import NOTES, delta_cells, figure_cells, result_rows, scored_rows
from factory.quality.groups import (
    BootstrapOptions, Comparison, GroupDeltas, GroupScores, ScoredRows, ScoreReport, compare, report,
)
from factory.quality.scores import TEXT_SCORE_COLUMNS, text_scores

log = structlog.get_logger(__name__)

ClipMode = Literal["missing", "all", "none"]
CLIP_BATCH = 16  # images per CLIP call: a batch's decoded images are all that is held
_IMAGE_TASKS = ("generate", "edit")
_NAMED = 20  # unreadable images named in the report (all are counted)


class FolderScores(BaseModel):
    """One results folder, scored."""

    model_config = ConfigDict(extra="forbid")

    results: str = Field(description="The results folder read")
    rows: int = Field(description="Result rows read, scored or not")
    clip_scored: int = Field(description="Images scored here (their stored clip_score, if any, replaced)")
    clip_unreadable: int = Field(description="Images that needed a score and could not be read (left unscored)")
    unreadable: list[str] = Field(description="Some of those, as tenant/id")
    scores: ScoreReport = Field(description="Figures in all and per tenant, region and adapter, with intervals")


class Evaluation(BaseModel):
    """What `factory eval` found: the folder's scores and, with `--against`, the other's and the comparison."""

    model_config = ConfigDict(extra="forbid")

    new: FolderScores
    old: FolderScores | None = Field(default=None, description="The folder compared against")
    comparison: Comparison | None = Field(default=None, description="new - old on the rows both have")
    clip_model: str | None = Field(description="The CLIP model that scored images here (None: none was needed)")
    bootstrap: BootstrapOptions
    notes: dict[str, str]


def results_of(uri: str, storage: Storage) -> tuple[str, OutputLayout]:
    """The results folder and its run's layout, from a run folder (OUTPUT/<run id>) or its `results/`."""
    stripped = uri.rstrip("/")
    root = stripped.rsplit("/", 1)[0] if stripped.rsplit("/", 1)[-1] == "results" else stripped
    layout = OutputLayout(root)
    if not any(True for _ in storage.list_files(layout.results, suffixes=[".parquet"])):
        raise InputError(f"{uri}: no results here (expected {layout.results}/tenant=.../*.parquet)")
    return layout.results, layout


class LazyClip:
    """The CLIP model of a profile (`profile`, else the one the rows name), loaded once, on first need."""

    def __init__(self, profile: str | None):
        self.profile = profile
        self.scorer = None
        self.version: str | None = None

    def score(self, images, prompts: list[str], rows_profile: str | None) -> list[float]:
        if self.scorer is None:
            from factory.model.clip import ClipScorer, clip_version, pin_clip, scoring_model
            from factory.model.profiles import get_profile

            clip = pin_clip(scoring_model(get_profile(self.profile or rows_profile or "tiny")))
            self.scorer, self.version = ClipScorer.from_profile(clip), clip_version(clip)
        return self.scorer.score(images, prompts)


def score_folder(uri: str, storage: Storage, clip: LazyClip, mode: ClipMode,
                 bootstrap: BootstrapOptions) -> tuple[FolderScores, ScoredRows]:
    """A folder's scores, and its `ScoredRows` (for a comparison)."""
    results, layout = results_of(uri, storage)
    rows = [_text_rescored(row) for row in result_rows(storage, results)]
    scored, unreadable = _clip_rescored(rows, layout, storage, clip, mode)
    scored_set = scored_rows(rows)
    folder = FolderScores(results=results, rows=len(rows), clip_scored=scored, clip_unreadable=len(unreadable),
                          unreadable=unreadable[:_NAMED], scores=report(scored_set, bootstrap))
    return folder, scored_set


def _text_rescored(row: dict[str, Any]) -> dict[str, Any]:
    for column in TEXT_SCORE_COLUMNS:
        row[column] = None
    if row.get("status") == "ok":
        row.update(text_scores(caption=row.get("caption"), answer=row.get("answer"),
                               references=row.get("references"), answers=row.get("answers")))
    return row


def _clip_rescored(rows: list[dict], layout: OutputLayout, storage: Storage, clip: LazyClip,
                   mode: ClipMode) -> tuple[int, list[str]]:
    if mode == "none":
        return 0, []
    wanted = [row for row in rows if row.get("task") in _IMAGE_TASKS and row.get("status") == "ok"
              and (mode == "all" or row.get("clip_score") is None)]
    profiles = Counter(row.get("profile") for row in wanted if row.get("profile"))
    if clip.profile is None and len(profiles) > 1:
        raise InputError(f"{layout.results}: images of several profiles ({', '.join(sorted(profiles))}); name the "
                         "one whose CLIP model scores them with --profile")
    rows_profile = next(iter(profiles), None)
    scored, unreadable = 0, []
    for start in range(0, len(wanted), CLIP_BATCH):
        batch, images = [], []
        for row in wanted[start:start + CLIP_BATCH]:
            uri = row.get("image_uri") or layout.image(row["tenant"], row["id"])
            try:
                images.append(decode_image(storage.read_bytes(uri), uri))
                batch.append(row)
            except InputError as error:
                log.warning("image not scored", tenant=row["tenant"], row_id=row["id"], error=str(error))
                unreadable.append(f"{row['tenant']}/{row['id']}")
        if batch:
            scores = clip.score(images, [row.get("prompt") or "" for row in batch], rows_profile)
            for row, score in zip(batch, scores, strict=True):
                row["clip_score"] = score
            scored += len(batch)
    return scored, unreadable


def evaluate(results: str, *, against: str | None = None, profile: str | None = None, clip: ClipMode = "missing",
             bootstrap: BootstrapOptions | None = None, storage: Storage | None = None) -> Evaluation:
    """Score `results` (and `against`, and compare them); see the module docstring."""
    storage = storage or Storage()
    bootstrap = bootstrap or BootstrapOptions()
    scorer = LazyClip(profile)
    new, new_rows = score_folder(results, storage, scorer, clip, bootstrap)
    old = comparison = None
    if against is not None:
        old, old_rows = score_folder(against, storage, scorer, clip, bootstrap)
        comparison = compare(new_rows, old_rows, bootstrap)
    return Evaluation(new=new, old=old, comparison=comparison, clip_model=scorer.version, bootstrap=bootstrap,
                      notes=NOTES)


# ---- what the command prints ----


def evaluation_lines(evaluation: Evaluation) -> list[str]:
    """The evaluation as a person reads it: each figure with its interval and rows, in all and per group."""
    lines = []
    for label, folder in (("scored", evaluation.new), ("against", evaluation.old)):
        if folder is None:
            continue
        lines.append(f"{label} {folder.results}: {folder.rows} rows, {folder.clip_scored} images scored here"
                     + (f", {folder.clip_unreadable} unreadable" if folder.clip_unreadable else ""))
        lines += [f"  {name:<28} {text}" for name, text in _groups(folder.scores.overall, folder.scores.groups,
                                                                   _figures)]
    comparison = evaluation.comparison
    if comparison is not None:
        lines.append(f"new - old on {comparison.matched} paired rows ({comparison.only_new} only new, "
                     f"{comparison.only_old} only old)")
        lines += [f"  {name:<28} {text}" for name, text in _groups(comparison.overall, comparison.groups, _deltas)]
    return lines


def _groups(overall, groups: dict, describe) -> list[tuple[str, str]]:
    return [("overall", describe(overall))] + [(f"{dimension} {key}", describe(figures))
                                               for dimension, members in groups.items()
                                               for key, figures in members.items()]


def _figures(scores: GroupScores) -> str:
    return " · ".join(figure_cells(scores)) or f"{scores.rows} rows, nothing scored"


def _deltas(deltas: GroupDeltas) -> str:
    return " · ".join(delta_cells(deltas)) or f"{deltas.rows} rows, nothing compared"
