"""One result row's text scores: VQA accuracy of its answer against its expected answers, and the BLEU counts of its
caption against its reference captions. No model is needed, so these are computed where result rows are shaped
(a job's rows, `factory eval` on a results folder), never in a replica.

CIDEr-D is not a row score here: its document frequencies come from every reference of the evaluated set, so it
is scored over a set of rows at once (`factory.quality.groups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from factory.quality.captions import MAX_N, BleuCounts, bleu, bleu_counts, tokenize
from factory.quality.vqa import vqa_accuracy

# The result columns `text_scores` fills, with the BLEU counts a group's corpus BLEU is summed from.
TEXT_SCORE_COLUMNS = ("vqa_accuracy", "bleu4", "bleu_candidate_length", "bleu_reference_length", "bleu_guesses",
                      "bleu_matches")


def text_scores(*, caption: str | None, answer: str | None, references: Sequence[str] | None,
                answers: Sequence[str] | None) -> dict[str, Any]:
    """The score columns of a row that has an output and something to compare it with; empty otherwise (a row
    without references or answers, or one that made no caption or answer: blocked, failed, rejected)."""
    scores: dict[str, Any] = {}
    if answer is not None and answers:
        scores["vqa_accuracy"] = vqa_accuracy(answer, answers)
    if caption is not None and references:
        scores.update(bleu_columns(bleu_counts(tokenize(caption), [tokenize(text) for text in references])))
    return scores


def bleu_columns(counts: BleuCounts) -> dict[str, Any]:
    """A row's BLEU counts as result columns, with its sentence BLEU-4."""
    return {
        "bleu4": bleu(counts)[MAX_N - 1], "bleu_candidate_length": counts.candidate_length,
        "bleu_reference_length": counts.reference_length, "bleu_guesses": list(counts.guesses),
        "bleu_matches": list(counts.matches),
    }


def counts_of(row: dict[str, Any]) -> BleuCounts | None:
    """The BLEU counts a result row carries (None when it has none)."""
    if row.get("bleu_guesses") is None:
        return None
    return BleuCounts(candidate_length=row["bleu_candidate_length"], reference_length=row["bleu_reference_length"],
                      guesses=tuple(row["bleu_guesses"]), matches=tuple(row["bleu_matches"]))
