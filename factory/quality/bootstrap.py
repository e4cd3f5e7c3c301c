"""Percentile bootstrap confidence intervals over rows, seeded, and paired for comparing two runs on the same rows.

Paired means each resample draws rows, not scores: a row's score under the new run and under the old one stay
together, so the interval is that of the mean difference and is as narrow as the two runs' agreement allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from factory.quality.captions import MAX_N, BleuCounts, bleu

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


class Interval(BaseModel):
    """An estimate over rows with its percentile-bootstrap confidence interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    estimate: float = Field(description="The statistic on all rows (a mean, or a mean difference)")
    low: float = Field(description="Lower end of the interval")
    high: float = Field(description="Upper end of the interval")
    confidence: float = Field(gt=0, lt=1, description="Share of resampled statistics inside [low, high]")
    resamples: int = Field(ge=1, description="Bootstrap resamples drawn")
    rows: int = Field(ge=1, description="Rows the estimate is over")
    seed: int = Field(description="Seed of the resampling: the same inputs and seed give the same interval")


def bootstrap(rows: int, statistic: Callable[[np.ndarray], float], *, confidence: float = DEFAULT_CONFIDENCE,
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """`statistic(indices)` on all rows and its percentile interval over `resamples` draws of `rows` row indices
    with replacement."""
    if rows < 1:
        raise ValueError("bootstrap needs at least one row")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    generator = np.random.default_rng(seed)
    # One draw at a time: memory stays at one row-index array however many rows a run has.
    drawn = np.array([statistic(generator.integers(0, rows, rows)) for _ in range(resamples)])
    tail = (1 - confidence) / 2
    low, high = np.quantile(drawn, [tail, 1 - tail])
    return Interval(estimate=statistic(np.arange(rows)), low=float(low), high=float(high), confidence=confidence,
                    resamples=resamples, rows=rows, seed=seed)


def mean_interval(values: Sequence[float], **options) -> Interval:
    """The mean of per-row scores (CLIPScore, VQA accuracy, CIDEr-D, sentence BLEU) with its interval."""
    scores = np.asarray(values, dtype=np.float64)
    return bootstrap(len(scores), lambda rows: float(scores[rows].mean()), **options)


def paired_delta_interval(new: Sequence[float], old: Sequence[float], **options) -> Interval:
    """Mean of new - old over the same rows (aligned by position) with its paired interval."""
    if len(new) != len(old):
        raise ValueError(f"paired scores: {len(new)} new rows but {len(old)} old rows")
    return mean_interval(np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64), **options)


def _counts_matrix(counts: Sequence[BleuCounts]) -> np.ndarray:
    return np.array([[c.candidate_length, c.reference_length, *c.guesses, *c.matches] for c in counts], dtype=np.int64)


def _summed_bleu4(matrix: np.ndarray) -> float:
    total = matrix.sum(axis=0).tolist()
    summed = BleuCounts(candidate_length=total[0], reference_length=total[1], guesses=tuple(total[2:2 + MAX_N]),
                        matches=tuple(total[2 + MAX_N:]))
    return bleu(summed)[MAX_N - 1]


def bleu4_interval(counts: Sequence[BleuCounts], **options) -> Interval:
    """Corpus BLEU-4 of the rows with its interval: each resample sums the drawn rows' counts."""
    matrix = _counts_matrix(counts)
    return bootstrap(len(counts), lambda rows: _summed_bleu4(matrix[rows]), **options)


def paired_bleu4_interval(new: Sequence[BleuCounts], old: Sequence[BleuCounts], **options) -> Interval:
    """Corpus BLEU-4 of new minus that of old over the same rows (aligned by position): BLEU is not a mean of
    rows, so each resample sums the drawn rows' counts, as corpus BLEU does."""
    if len(new) != len(old):
        raise ValueError(f"paired counts: {len(new)} new rows but {len(old)} old rows")
    new_matrix, old_matrix = _counts_matrix(new), _counts_matrix(old)
    return bootstrap(len(new), lambda rows: _summed_bleu4(new_matrix[rows]) - _summed_bleu4(old_matrix[rows]),
                     **options)
