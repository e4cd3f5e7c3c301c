"""Scores of a set of result rows, in all and per group (tenant, region, adapter), and of two sets on the same rows.

Row scores add up. A group's CLIPScore and VQA accuracy are its rows' {rows, sum, mean}; its BLEU-1..4 is the BLEU
of its rows' summed counts (corpus BLEU, as pycocoevalcap's `Bleu(4)` scores a set). CIDEr-D is different: its
document frequencies come from the references of a whole set of rows, so every caption row is scored once against
the frequencies of all the caption rows given (a run's, or a results folder's), and a group's CIDEr-D is the mean of
its rows' scores. That is not pycocoevalcap's `Cider()` run on the group alone, whose frequencies would come from
the group's own references; with the set's, every group is measured with the same weights, so groups compare.

Intervals are percentile bootstraps over the group's rows (`factory.quality.bootstrap`); a comparison of two sets
pairs rows by (tenant, id) and bootstraps the mean difference (BLEU-4: the difference of summed counts' BLEU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from factory.quality.bootstrap import (
    DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, Interval, bleu4_interval, mean_interval, paired_bleu4_interval,
    paired_delta_interval,
)
from factory.quality.captions import MAX_N, BleuCounts, bleu, cider_d, tokenize
from factory.quality.scores import counts_of

# Per-row means: the score columns whose group figure is {rows, sum, mean}.
MEAN_SCORES = ("clip_score", "vqa_accuracy", "cider_d")
_COUNT_WIDTH = 2 + 2 * MAX_N  # candidate and reference length, guesses and matches per order


class BootstrapOptions(BaseModel):
    """How confidence intervals are drawn (a job's `quality.bootstrap`, `factory eval`'s options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resamples: int = Field(default=DEFAULT_RESAMPLES, ge=10, le=100_000, description="Bootstrap resamples per figure")
    confidence: float = Field(default=DEFAULT_CONFIDENCE, gt=0, lt=1, description="Interval coverage, e.g. 0.95")
    seed: int = Field(default=0, ge=0, description="Seed of the resampling: the same rows give the same interval")


class ScoreSum(BaseModel):
    """A per-row score added up over a group's rows that have it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=1, description="Rows with this score")
    sum: float = Field(description="Sum of their scores")
    mean: float = Field(description="sum / rows")
    interval: Interval | None = Field(default=None, description="Bootstrap interval of the mean (quality.json)")


class BleuSum(BaseModel):
    """BLEU of a group: its rows' counts summed, and BLEU-1..4 of the sum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=1, description="Caption rows with references")
    candidate_length: int = Field(ge=0, description="Caption tokens, summed")
    reference_length: int = Field(ge=0, description="Closest reference lengths, summed")
    guesses: list[int] = Field(description="Caption n-grams for n = 1..4, summed")
    matches: list[int] = Field(description="Of those, found in a reference (clipped), summed")
    bleu: list[float] = Field(description="BLEU-1..4 of the summed counts, in [0, 1]")
    bleu4_interval: Interval | None = Field(default=None, description="Bootstrap interval of BLEU-4 (quality.json)")


class GroupScores(BaseModel):
    """Every score a group of rows has; a score none of its rows has is None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=0, description="Rows in the group, scored or not")
    clip_score: ScoreSum | None = Field(default=None, description="CLIPScore of ok generated and edited images, 0-100")
    vqa_accuracy: ScoreSum | None = Field(default=None, description="VQA accuracy of ok answers, [0, 1]")
    bleu: BleuSum | None = Field(default=None, description="Corpus BLEU of ok captions against their references")
    cider_d: ScoreSum | None = Field(
        default=None, description="CIDEr-D of ok captions (x10 as pycocoevalcap), document frequencies from all the "
        "scored set's references"
    )


class ScoreReport(BaseModel):
    """Scores of a set of rows, in all and per group of each dimension ('tenant', 'region', 'adapter')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    overall: GroupScores = Field(description="Every row of the set")
    groups: dict[str, dict[str, GroupScores]] = Field(description="Dimension -> group key -> its rows' scores")


@dataclass
class ScoredRows:
    """Per-row numbers of a set of rows, by position: NaN where a row has no such score, BLEU counts only where
    `has_counts`, a caption's tokens and its references' only for caption rows with references (CIDEr-D is scored
    from them when the set to score is known). Built by `collect`."""

    ids: list[tuple[str, str]] = field(default_factory=list)  # (tenant, id)
    keys: list[dict[str, str]] = field(default_factory=list)  # dimension -> the row's group
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # clip_score, vqa_accuracy -> per-row values
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0, _COUNT_WIDTH), dtype=np.int64))
    has_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    captions: dict[int, tuple[str, list[str]]] = field(default_factory=dict)  # position -> tokens, references'
    _cider: np.ndarray | None = field(default=None, repr=False)  # over every caption row, once asked

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, positions: list[int]) -> ScoredRows:
        index = np.array(positions, dtype=np.int64)
        return ScoredRows(
            ids=[self.ids[i] for i in positions], keys=[self.keys[i] for i in positions],
            scores={name: values[index] for name, values in self.scores.items()}, counts=self.counts[index],
            has_counts=self.has_counts[index],
            captions={new: self.captions[old] for new, old in enumerate(positions) if old in self.captions},
        )

    def with_cider(self, among: list[int] | None = None) -> dict[str, np.ndarray]:
        """Every per-row score, CIDEr-D included: scored over the caption rows (of `among`, default all), each
        against the document frequencies of all of those rows' references."""
        if among is None and self._cider is not None:
            return {**self.scores, "cider_d": self._cider}
        positions = [p for p in (range(len(self)) if among is None else among) if p in self.captions]
        cider = np.full(len(self), np.nan)
        if positions:
            cider[positions] = cider_d([self.captions[p][0] for p in positions],
                                       [self.captions[p][1] for p in positions])
        if among is None:
            self._cider = cider
        return {**self.scores, "cider_d": cider}


def collect(rows: Iterable[Mapping[str, Any]], dimensions: Mapping[str, Callable[[Mapping[str, Any]], str | None]],
            ) -> ScoredRows:
    """Result rows (mappings with `tenant`, `id`, the score columns, `caption` and `references`), read once, as
    `ScoredRows`; each row's group in every dimension of `dimensions` (None: in no group of that dimension)."""
    ids, keys, clip, vqa, counts, has_counts = [], [], [], [], [], []
    captions: dict[int, tuple[str, list[str]]] = {}
    for position, row in enumerate(rows):
        ids.append((str(row["tenant"]), str(row["id"])))
        keys.append({name: key for name, group in dimensions.items() if (key := group(row)) is not None})
        clip.append(_number(row.get("clip_score")))
        vqa.append(_number(row.get("vqa_accuracy")))
        row_counts = counts_of(row)
        has_counts.append(row_counts is not None)
        counts.append(_count_vector(row_counts) if row_counts is not None else [0] * _COUNT_WIDTH)
        if row.get("caption") is not None and row.get("references"):
            captions[position] = (tokenize(row["caption"]), [tokenize(text) for text in row["references"]])
    return ScoredRows(
        ids=ids, keys=keys, scores={"clip_score": np.array(clip, dtype=np.float64),
                                    "vqa_accuracy": np.array(vqa, dtype=np.float64)},
        counts=np.array(counts, dtype=np.int64).reshape(-1, _COUNT_WIDTH), has_counts=np.array(has_counts, dtype=bool),
        captions=captions,
    )


def _members(keys: list[dict[str, str]]) -> dict[str, dict[str, list[int]]]:
    members: dict[str, dict[str, list[int]]] = {}
    for position, row_keys in enumerate(keys):
        for dimension, key in row_keys.items():
            members.setdefault(dimension, {}).setdefault(key, []).append(position)
    return {dimension: dict(sorted(groups.items())) for dimension, groups in sorted(members.items())}


def report(scored: ScoredRows, intervals: BootstrapOptions | None = None) -> ScoreReport:
    """The set's scores in all and per group; with `intervals`, each figure with its bootstrap interval."""
    scores = scored.with_cider()
    return ScoreReport(
        overall=group_scores(scored, scores, np.arange(len(scored)), intervals),
        groups={dimension: {key: group_scores(scored, scores, np.array(rows), intervals)
                            for key, rows in groups.items()}
                for dimension, groups in _members(scored.keys).items()},
    )


def group_scores(scored: ScoredRows, scores: dict[str, np.ndarray], rows: np.ndarray,
                 intervals: BootstrapOptions | None) -> GroupScores:
    """The figures of the rows at `rows`, from `scores` (`ScoredRows.with_cider`)."""
    options = intervals.model_dump() if intervals is not None else None
    figures: dict[str, Any] = {}
    for name in MEAN_SCORES:
        values = scores[name][rows]
        values = values[~np.isnan(values)]
        if len(values):
            total = float(values.sum())
            figures[name] = ScoreSum(rows=len(values), sum=total, mean=total / len(values),
                                     interval=mean_interval(values, **options) if options else None)
    counted = scored.counts[rows][scored.has_counts[rows]]
    if len(counted):
        figures["bleu"] = _bleu_sum(counted, options)
    return GroupScores(rows=len(rows), **figures)


def _bleu_sum(counted: np.ndarray, options: dict | None) -> BleuSum:
    summed = _counts_from_vector(counted.sum(axis=0))
    interval = bleu4_interval([_counts_from_vector(vector) for vector in counted], **options) if options else None
    return BleuSum(rows=len(counted), candidate_length=summed.candidate_length,
                   reference_length=summed.reference_length, guesses=list(summed.guesses),
                   matches=list(summed.matches), bleu=list(bleu(summed)), bleu4_interval=interval)


# ---- two sets of rows on the same rows ----


class Delta(BaseModel):
    """One score of the rows both sets scored: each set's figure and the difference with its paired interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    new: float = Field(description="The new set's figure on the paired rows (a mean, or BLEU-4 of summed counts)")
    old: float = Field(description="The old set's figure on the same rows")
    delta: Interval = Field(description="new - old, with its paired bootstrap interval; `rows` is how many paired")


class GroupDeltas(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=0, description="Rows of this group present in both sets")
    clip_score: Delta | None = None
    vqa_accuracy: Delta | None = None
    bleu4: Delta | None = None
    cider_d: Delta | None = None


class Comparison(BaseModel):
    """A new set of rows against an old one, rows paired by (tenant, id)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    matched: int = Field(description="Rows present in both sets")
    only_new: int = Field(description="Rows of the new set the old one lacks (not compared)")
    only_old: int = Field(description="Rows of the old set the new one lacks (not compared)")
    unmatched: list[str] = Field(description="Some of those rows, as 'new|old: tenant/id', for finding them")
    overall: GroupDeltas
    groups: dict[str, dict[str, GroupDeltas]] = Field(description="Dimension -> the new set's group key -> deltas")


_UNMATCHED_SHOWN = 20


def compare(new: ScoredRows, old: ScoredRows, intervals: BootstrapOptions | None = None) -> Comparison:
    """Paired differences of every score, in all and per group, on the rows both sets have (by tenant and id). A
    row's group is the new set's; where the old set put it elsewhere (another adapter) the key is `new vs old`.
    CIDEr-D of each side is scored over the paired caption rows only, so both use the same rows' frequencies."""
    options = (intervals or BootstrapOptions()).model_dump()
    old_position = {key: position for position, key in enumerate(old.ids)}
    new_rows = [position for position, key in enumerate(new.ids) if key in old_position]
    old_rows = [old_position[new.ids[position]] for position in new_rows]
    new_keys = set(new.ids)
    unmatched = [f"new: {tenant}/{row_id}" for tenant, row_id in new.ids if (tenant, row_id) not in old_position]
    unmatched += [f"old: {tenant}/{row_id}" for tenant, row_id in old.ids if (tenant, row_id) not in new_keys]
    a, b = new.subset(new_rows), old.subset(old_rows)
    captioned = [position for position in range(len(a)) if position in a.captions and position in b.captions]
    a_scores, b_scores = a.with_cider(captioned), b.with_cider(captioned)
    keys = [{dimension: key if b_keys.get(dimension, key) == key else f"{key} vs {b_keys[dimension]}"
             for dimension, key in a_keys.items()} for a_keys, b_keys in zip(a.keys, b.keys, strict=True)]

    def deltas(rows: np.ndarray) -> GroupDeltas:
        return _deltas(a, b, a_scores, b_scores, rows, options)

    return Comparison(
        matched=len(new_rows), only_new=len(new) - len(new_rows), only_old=len(old) - len(old_rows),
        unmatched=unmatched[:_UNMATCHED_SHOWN], overall=deltas(np.arange(len(a))),
        groups={dimension: {key: deltas(np.array(rows)) for key, rows in groups.items()}
                for dimension, groups in _members(keys).items()},
    )


def _deltas(new: ScoredRows, old: ScoredRows, new_scores: dict[str, np.ndarray], old_scores: dict[str, np.ndarray],
            rows: np.ndarray, options: dict) -> GroupDeltas:
    figures: dict[str, Any] = {}
    for name in MEAN_SCORES:
        a, b = new_scores[name][rows], old_scores[name][rows]
        both = ~np.isnan(a) & ~np.isnan(b)
        if both.any():
            figures[name] = Delta(new=float(a[both].mean()), old=float(b[both].mean()),
                                  delta=paired_delta_interval(a[both], b[both], **options))
    both = new.has_counts[rows] & old.has_counts[rows]
    if both.any():
        a = [_counts_from_vector(vector) for vector in new.counts[rows][both]]
        b = [_counts_from_vector(vector) for vector in old.counts[rows][both]]
        figures["bleu4"] = Delta(new=bleu(a)[MAX_N - 1], old=bleu(b)[MAX_N - 1],
                                 delta=paired_bleu4_interval(a, b, **options))
    return GroupDeltas(rows=len(rows), **figures)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _count_vector(counts: BleuCounts) -> list[int]:
    return [counts.candidate_length, counts.reference_length, *counts.guesses, *counts.matches]


def _counts_from_vector(vector: np.ndarray) -> BleuCounts:
    values = [int(value) for value in vector]
    return BleuCounts(candidate_length=values[0], reference_length=values[1], guesses=tuple(values[2:2 + MAX_N]),
                      matches=tuple(values[2 + MAX_N:]))
