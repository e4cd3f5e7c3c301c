"""Percentile bootstrap intervals: seeded, paired over rows, and right on inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from factory.quality.bootstrap import mean_interval, paired_bleu4_interval, paired_delta_interval
from factory.quality.captions import bleu, bleu_counts


def test_a_constant_difference_has_a_zero_width_interval_at_that_difference():
    old = np.random.default_rng(1).uniform(0, 100, 300)
    interval = paired_delta_interval(old + 2.5, old)
    assert interval.estimate == pytest.approx(2.5)
    assert interval.low == pytest.approx(2.5) and interval.high == pytest.approx(2.5)
    assert interval.rows == 300


def test_the_interval_of_a_known_distribution_has_the_expected_width_around_the_sample_mean():
    values = np.random.default_rng(7).normal(0.5, 1.0, 400)
    interval = mean_interval(values, confidence=0.95, resamples=2000, seed=3)
    assert interval.estimate == pytest.approx(values.mean())
    assert interval.low < interval.estimate < interval.high
    # The normal approximation: 2 * 1.96 * sigma / sqrt(n).
    assert interval.high - interval.low == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.15)


def test_95_percent_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    generator = np.random.default_rng(11)
    samples = [generator.exponential(2.0, 100) for _ in range(150)]  # skewed, true mean 2
    covered = [interval.low <= 2.0 <= interval.high
               for interval in (mean_interval(sample, resamples=300, seed=i) for i, sample in enumerate(samples))]
    assert 0.88 <= sum(covered) / len(covered) <= 0.99


def test_the_seed_decides_the_interval():
    values = np.random.default_rng(0).uniform(0, 1, 50)
    assert mean_interval(values, seed=5) == mean_interval(values, seed=5)
    assert mean_interval(values, seed=5) != mean_interval(values, seed=6)


def test_pairing_keeps_a_small_consistent_gain_visible_through_large_row_differences():
    rows = np.random.default_rng(2).uniform(0, 100, 200)  # rows differ a lot from each other...
    gain = 0.5 + np.random.default_rng(3).normal(0, 0.1, 200)  # ...the new run is a little better on each
    paired = paired_delta_interval(rows + gain, rows)
    assert 0.45 < paired.low < paired.estimate < paired.high < 0.55
    unpaired_width = 2 * 1.96 * np.sqrt(2 * rows.var() / 200)
    assert paired.high - paired.low < unpaired_width / 50


def test_corpus_bleu_difference_resamples_rows_of_counts():
    references = [["a man riding a wave on a surfboard"], ["two dogs playing with a frisbee in the grass"],
                  ["a plate of food with broccoli"], ["a red stop sign by a road"]] * 10
    old = [bleu_counts(candidate, refs) for candidate, refs in
           zip(["a man on a board", "dogs in grass", "food", "a sign"] * 10, references)]
    new = [bleu_counts(refs[0], refs) for refs in references]  # the new run says exactly what the humans said
    interval = paired_bleu4_interval(new, old, seed=0)
    assert interval.estimate == pytest.approx(bleu(new)[3] - bleu(old)[3])
    assert 0 < interval.low <= interval.estimate <= interval.high <= 1
    same = paired_bleu4_interval(old, old)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_inputs_must_be_the_same_rows():
    with pytest.raises(ValueError, match="3 new rows but 2 old rows"):
        paired_delta_interval([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least one row"):
        mean_interval([])
