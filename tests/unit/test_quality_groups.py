"""Row scores and their sums per group: every group figure equals what its rows' scores give, BLEU and CIDEr-D as
pycocoevalcap scores the same rows, and two sets of rows compared on the rows they share."""

from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from factory.quality.bootstrap import paired_bleu4_interval, paired_delta_interval
from factory.quality.captions import bleu_counts, tokenize
from factory.quality.groups import BootstrapOptions, collect, compare, report
from factory.quality.scores import counts_of, text_scores
from factory.quality.vqa import vqa_accuracy

CAPTIONS = [
    ("A man riding a wave on top of a surfboard.",
     ["A man riding a wave on a surfboard.", "A surfer riding a large wave in the ocean."]),
    ("Two dogs playing with a frisbee.",
     ["Two dogs playing with a frisbee in the grass.", "Dogs chase a red frisbee on a lawn."]),
    ("A plate of food.", ["A plate of food with broccoli, rice and meat.", "A white plate topped with meat."]),
    ("A kitchen.", ["A kitchen with a stove, a sink, and a refrigerator.", "A small kitchen with white cabinets."]),
    ("A red sign by the road.", ["A red stop sign sitting on the side of a road."]),
    ("A cat on a sofa.", ["A cat sleeping on a sofa.", "An orange cat on a couch by a window."]),
]
QUESTIONS = [("Yes.", ["yes"] * 10), ("two", ["2"] * 4 + ["3"] * 6), ("red", ["blue"] * 10), ("Blue", ["blue"])]
DIMENSIONS = {
    "tenant": lambda row: row["tenant"],
    "region": lambda row: f"{row['tenant']}/{row['region']}" if row.get("region") else None,
    "adapter": lambda row: row.get("adapter") or f"{row['tenant']}/base",
}


def _rows(seed: int = 0, adapter: str = "acme/brand") -> list[dict]:
    """Result rows of three tasks over two tenants, scored as a job scores them."""
    generator = np.random.default_rng(seed)
    rows = []
    for i in range(8):
        rows.append({"tenant": "acme" if i % 2 else "globex", "id": f"g{i}", "task": "generate",
                     "region": "eu" if i % 3 else "na", "adapter": adapter if i % 2 else None,
                     "clip_score": float(generator.uniform(15, 35)) if i != 5 else None})  # g5: blocked
    for i, (caption, references) in enumerate(CAPTIONS):
        rows.append({"tenant": "acme" if i < 4 else "globex", "id": f"c{i}", "task": "caption", "region": None,
                     "caption": caption, "references": references})
    for i, (answer, answers) in enumerate(QUESTIONS):
        rows.append({"tenant": "acme" if i % 2 else "globex", "id": f"q{i}", "task": "vqa", "region": "eu",
                     "answer": answer, "answers": answers})
    for row in rows:
        row.update(text_scores(caption=row.get("caption"), answer=row.get("answer"),
                               references=row.get("references"), answers=row.get("answers")))
    return rows


def _coco(values):
    return {i: list(value) if isinstance(value, list) else [value] for i, value in enumerate(values)}


def test_row_text_scores_are_the_metrics_of_the_row():
    vqa = text_scores(caption=None, answer="Two", references=None, answers=["2"] * 4 + ["3"] * 6)
    assert vqa == {"vqa_accuracy": vqa_accuracy("Two", ["2"] * 4 + ["3"] * 6)} and vqa["vqa_accuracy"] == 1.0
    caption, references = CAPTIONS[0]
    scores = text_scores(caption=caption, answer=None, references=references, answers=None)
    _, per_row = Bleu(4).compute_score({0: [tokenize(text) for text in references]}, {0: [tokenize(caption)]},
                                       verbose=0)
    assert scores["bleu4"] == per_row[3][0]
    assert counts_of(scores) == bleu_counts(tokenize(caption), [tokenize(text) for text in references])
    # Nothing to compare, or nothing made (blocked, failed): no score.
    assert text_scores(caption=caption, answer=None, references=None, answers=None) == {}
    assert text_scores(caption=None, answer=None, references=references, answers=["yes"]) == {}


def test_group_sums_are_the_sums_of_their_rows_scores():
    rows = _rows()
    scores = report(collect(rows, DIMENSIONS))
    for dimension, group in DIMENSIONS.items():
        for key, figures in scores.groups[dimension].items():
            members = [row for row in rows if group(row) == key]
            assert figures.rows == len(members)
            for name in ("clip_score", "vqa_accuracy"):
                values = [row[name] for row in members if row.get(name) is not None]
                summed = getattr(figures, name)
                if not values:
                    assert summed is None
                    continue
                assert (summed.rows, summed.sum, summed.mean) == (len(values), pytest.approx(sum(values)),
                                                                  pytest.approx(sum(values) / len(values)))
                assert summed.interval is None  # intervals only when asked (quality.json), not in the summary
    overall = scores.overall
    assert overall.rows == len(rows) and overall.clip_score.rows == 7 and overall.vqa_accuracy.rows == 4


def test_group_bleu_is_pycocoevalcaps_bleu_of_the_groups_rows():
    rows = _rows()
    scores = report(collect(rows, DIMENSIONS))
    for tenant in ("acme", "globex"):
        members = [row for row in rows if row["tenant"] == tenant and row.get("references")]
        expected, _ = Bleu(4).compute_score(_coco([[tokenize(t) for t in row["references"]] for row in members]),
                                            _coco([tokenize(row["caption"]) for row in members]), verbose=0)
        assert scores.groups["tenant"][tenant].bleu.bleu == list(expected)
        assert scores.groups["tenant"][tenant].bleu.rows == len(members)


def test_cider_d_uses_the_whole_sets_frequencies_in_every_group():
    rows = _rows()
    scores = report(collect(rows, DIMENSIONS))
    captioned = [row for row in rows if row.get("references")]
    overall, per_row = Cider().compute_score(_coco([[tokenize(t) for t in row["references"]] for row in captioned]),
                                             _coco([tokenize(row["caption"]) for row in captioned]))
    assert scores.overall.cider_d.mean == pytest.approx(overall, rel=1e-12)
    acme = [score for score, row in zip(per_row, captioned) if row["tenant"] == "acme"]
    assert scores.groups["tenant"]["acme"].cider_d.sum == pytest.approx(sum(acme), rel=1e-12)
    # Not pycocoevalcap run on the group alone: its frequencies would be the group's.
    alone, _ = Cider().compute_score(
        _coco([[tokenize(t) for t in row["references"]] for row in captioned if row["tenant"] == "acme"]),
        _coco([tokenize(row["caption"]) for row in captioned if row["tenant"] == "acme"]))
    assert scores.groups["tenant"]["acme"].cider_d.mean != pytest.approx(alone)


def test_intervals_surround_each_figure_when_asked():
    scores = report(collect(_rows(), DIMENSIONS), BootstrapOptions(resamples=200, seed=4))
    clip = scores.overall.clip_score
    assert clip.interval.low <= clip.mean <= clip.interval.high and clip.interval.rows == 7
    assert clip.interval.resamples == 200 and clip.interval.seed == 4
    bleu4 = scores.overall.bleu
    assert bleu4.bleu4_interval.estimate == bleu4.bleu[3]
    assert bleu4.bleu4_interval.low <= bleu4.bleu[3] <= bleu4.bleu4_interval.high


def test_two_sets_compare_on_the_rows_they_share():
    old = _rows(seed=1, adapter="acme/brand")
    new = [dict(row) for row in _rows(seed=2, adapter="acme/brand-v2") if row["id"] != "g7"]  # g7: not in new
    for row in new:  # the new adapter captions the first image better
        if row["id"] == "c0":
            row.update(caption=row["references"][0], **text_scores(caption=row["references"][0], answer=None,
                                                                    references=row["references"], answers=None))
    new.append({"tenant": "acme", "id": "extra", "task": "generate", "clip_score": 30.0})
    options = BootstrapOptions(resamples=300, seed=9)
    comparison = compare(collect(new, DIMENSIONS), collect(old, DIMENSIONS), options)

    assert (comparison.matched, comparison.only_new, comparison.only_old) == (len(old) - 1, 1, 1)
    assert sorted(comparison.unmatched) == ["new: acme/extra", "old: acme/g7"]
    # Expected values computed here, by aligning the rows by (tenant, id) independently.
    by_key = {(row["tenant"], row["id"]): row for row in old}
    paired = [(row, by_key[(row["tenant"], row["id"])]) for row in new if (row["tenant"], row["id"]) in by_key]
    clip = [(a["clip_score"], b["clip_score"]) for a, b in paired if a.get("clip_score") is not None
            and b.get("clip_score") is not None]
    expected = paired_delta_interval([a for a, _ in clip], [b for _, b in clip], **options.model_dump())
    assert comparison.overall.clip_score.delta == expected
    assert comparison.overall.clip_score.new - comparison.overall.clip_score.old == pytest.approx(expected.estimate)
    counts = [(counts_of(a), counts_of(b)) for a, b in paired if a.get("bleu_guesses") is not None]
    bleu4 = paired_bleu4_interval([a for a, _ in counts], [b for _, b in counts], **options.model_dump())
    assert comparison.overall.bleu4.delta == bleu4 and bleu4.estimate > 0
    assert comparison.overall.vqa_accuracy.delta.estimate == 0.0  # the same answers on both sides
    # Rows the new set gives another adapter are grouped under both names.
    assert set(comparison.groups["adapter"]) == {"acme/brand-v2 vs acme/brand", "globex/base", "acme/base"}
