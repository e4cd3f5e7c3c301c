"""VQA accuracy: the official VQAv2 answer normalisation and the leave-one-human-out consensus."""

from __future__ import annotations

import pytest

from factory.quality.vqa import normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("two", "2"),                     # number words become digits
        ("none", "0"),
        ("ten.", "10"),
        ("a dog", "dog"),                 # articles go
        ("The beach", "beach"),
        ("dont", "don't"),                # the apostrophe goes back into contractions
        ("isnt", "isn't"),
        ("yes.", "yes"),                  # a period not before a digit goes...
        ("3.5", "3.5"),                   # ...one before a digit stays
        ("1,000", "1000"),                # a thousands comma joins the number
        ("red, white", "red white"),      # a mark touching a space is deleted
        ("black/white", "black white"),   # a mark between words becomes a space
        ("hot-dog", "hot dog"),
        ("(red)", "red"),
        ("Yes", "yes"),
        ("  many\n", "many"),
        ("The Two Dogs!", "2 dogs"),
    ],
)
def test_answers_are_normalized_as_the_official_evaluation_does(raw, normalized):
    assert normalize_answer(raw) == normalized


def _humans(answer: str, agreeing: int, other: str = "cat") -> list[str]:
    return [answer] * agreeing + [other] * (10 - agreeing)


@pytest.mark.parametrize(("agreeing", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_is_min_of_agreeing_humans_over_three_averaged_over_leave_one_out(agreeing, accuracy):
    # Three agreeing humans give 0.9, not 1: in the three subsets that leave one of them out only two agree.
    assert vqa_accuracy("dog", _humans("dog", agreeing)) == pytest.approx(accuracy)


def test_disagreeing_humans_and_the_prediction_are_normalized_alike():
    answers = ["2", "two", "Two", "3", "3", "three", "4", "four", "5", "2 "]
    assert vqa_accuracy("Two.", answers) == pytest.approx(1.0)    # four humans said 2 in some form
    assert vqa_accuracy("three", answers) == pytest.approx(0.9)
    assert vqa_accuracy("the four", answers) == pytest.approx(0.6)


def test_unanimous_humans_are_compared_as_written():
    # The official code normalises human answers only when they disagree (the released ones are normalised already).
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0  # the prediction is always normalised
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0


def test_fewer_than_four_expected_answers_score_by_exact_match():
    assert vqa_accuracy("2", ["Two"]) == 1.0
    assert vqa_accuracy("a dog", ["cat", "Dog."]) == 1.0
    assert vqa_accuracy("bird", ["cat", "dog", "fish"]) == 0.0


def test_no_expected_answer_is_an_error():
    with pytest.raises(ValueError, match="at least one expected answer"):
        vqa_accuracy("yes", [])
