"""What a row may be scored against: reference captions on caption rows, expected answers on VQA rows, as JSON,
CSV and Parquet give them, refused with the field named anywhere else, and carried to the row's result."""

from __future__ import annotations

import pytest

from factory.routing.executor import base_result
from factory.routing.parser import GenerationDefaults, RequestError, parse_request
from factory.routing.requests import MAX_EXPECTED, MAX_PROMPT_CHARS, Status

DEFAULTS = GenerationDefaults(steps=4, width=256, height=256, guidance=3.5)


def parse(**row):
    return parse_request({"id": "r1", "tenant": "acme"} | row, DEFAULTS)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["a cat on a sofa", "an orange cat"], ("a cat on a sofa", "an orange cat")),  # JSONL, Parquet lists
        ('["a cat on a sofa", "an orange cat"]', ("a cat on a sofa", "an orange cat")),  # a CSV cell: JSON
        ("a cat on a sofa", ("a cat on a sofa",)),  # a CSV cell: one caption
    ],
)
def test_caption_rows_carry_their_references_in_every_manifest_format(given, expected):
    request = parse(task="caption", image="a.png", references=given)
    assert request.references == expected and request.answers is None


def test_vqa_rows_carry_one_answer_or_many():
    assert parse(question="how many?", image="a.png", answers="2").answers == ("2",)
    ten = ["2"] * 7 + ["two"] * 3
    assert parse(prompt="Question: how many?", image="a.png", answers=ten).answers == tuple(ten)


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "a red bicycle", "references": ["a bike"]}, "references",
         "only caption rows take reference captions; this row is generate"),
        ({"question": "what?", "image": "a.png", "references": ["a bike"]}, "references",
         "only caption rows take reference captions; this row is vqa"),
        ({"task": "caption", "image": "a.png", "answers": ["yes"]}, "answers",
         "only vqa rows take expected answers; this row is caption"),
        ({"prompt": "Edit: make it blue", "image": "a.png", "answers": "yes"}, "answers",
         "only vqa rows take expected answers; this row is edit"),
        ({"task": "caption", "image": "a.png", "references": "[not json"}, "references",
         "must be a JSON list of texts"),
        ({"task": "caption", "image": "a.png", "references": []}, "references", "List should have at least 1 item"),
        ({"task": "caption", "image": "a.png", "references": ["ok", ""]}, "references[1]", "at least 1 character"),
        ({"question": "q?", "image": "a.png", "answers": ["x" * (MAX_PROMPT_CHARS + 1)]}, "answers[0]",
         f"at most {MAX_PROMPT_CHARS} characters"),
        ({"question": "q?", "image": "a.png", "answers": ["yes"] * (MAX_EXPECTED + 1)}, "answers",
         f"at most {MAX_EXPECTED} items"),
        ({"question": "q?", "image": "a.png", "answers": [3]}, "answers[0]", "valid string"),
    ],
)
def test_expected_outputs_are_refused_with_their_field_named(row, field, reason):
    with pytest.raises(RequestError) as error:
        parse(**row)
    assert error.value.field == field and reason in error.value.reason


def test_results_keep_what_their_row_is_scored_against():
    caption = base_result(parse(task="caption", image="a.png", references=["a cat"]), None, status=Status.OK)
    answer = base_result(parse(question="q?", image="a.png", answers=["yes", "yes"]), None, status=Status.OK)
    assert (caption.references, caption.answers) == (["a cat"], None)
    assert (answer.references, answer.answers) == (None, ["yes", "yes"])
    assert caption.clip_score is caption.vqa_accuracy is caption.bleu4 is caption.quality_ms is None
