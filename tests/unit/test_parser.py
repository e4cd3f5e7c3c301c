"""The router's rules and every error, without models."""

from __future__ import annotations

import pytest

from factory.routing.parser import GenerationDefaults, RequestError, default_seed, parse_request
from factory.routing.requests import Task

DEFAULTS = GenerationDefaults(steps=4, width=256, height=256, guidance=3.5)


def parse(**row):
    return parse_request({"id": "r1", "tenant": "acme"} | row, DEFAULTS)


@pytest.mark.parametrize(
    ("row", "task"),
    [
        ({"prompt": "a red bicycle"}, Task.GENERATE),
        ({"prompt": "Question: what is it?", "image": "a.png"}, Task.VQA),
        ({"prompt": "question:   lower case works", "image": "a.png"}, Task.VQA),
        ({"prompt": "Describe: the scene", "image": "a.png"}, Task.CAPTION),
        ({"prompt": "DESCRIBE:", "image": "a.png"}, Task.CAPTION),
        ({"question": "what is it?", "image": "a.png"}, Task.VQA),
        # An explicit task wins over the prefix.
        ({"task": "generate", "prompt": "Describe: a poster that says hello"}, Task.GENERATE),
        ({"task": "caption", "prompt": "Question: ignored as a question", "image": "a.png"}, Task.CAPTION),
        ({"task": "VQA", "question": "why?", "image": "a.png"}, Task.VQA),
        ({"task": "describe", "image": "a.png"}, Task.CAPTION),
    ],
)
def test_task_rules(row, task):
    assert parse(**row).task is task


def test_prefixes_are_stripped_and_defaults_filled():
    vqa = parse(prompt="Question: how many cups?", image="s3://b/a.png")
    assert vqa.question == "how many cups?" and vqa.image == "s3://b/a.png"
    caption = parse(prompt="Describe:", image="a.png")
    assert caption.prompt is None  # falls back to the profile's caption instruction
    gen = parse(prompt="a red bicycle")
    assert (gen.steps, gen.width, gen.height, gen.guidance) == (4, 256, 256, 3.5)
    assert gen.seed == default_seed("acme", "r1") == parse(prompt="other prompt").seed
    assert parse(prompt="x", seed=0).seed == 0 and parse(prompt="x", guidance=0).guidance == 0.0


def test_csv_style_values_are_coerced():
    request = parse_request(
        {"id": 17, "tenant": "acme", "prompt": "a cat", "seed": "42", "width": "512", "height": "", "steps": ""},
        DEFAULTS,
    )
    assert request.id == "17" and request.seed == 42 and request.width == 512 and request.height == 256


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({}, "prompt", "required"),
        ({"prompt": "   "}, "prompt", "required"),
        ({"prompt": ""}, "prompt", "required"),
        ({"prompt": "Question: what?"}, "image", "required for vqa"),
        ({"prompt": "Describe: it"}, "image", "required for caption"),
        ({"prompt": "Question:", "image": "a.png"}, "question", "required for vqa"),
        ({"task": "vqa", "image": "a.png"}, "question", "required"),
        ({"task": "paint", "prompt": "x"}, "task", "unknown task 'paint'"),
        ({"prompt": "x", "width": 100}, "width", "multiple of 16"),
        ({"prompt": "x", "height": 8}, "height", "greater than or equal to 16"),
        ({"prompt": "x", "width": 100_000}, "width", "less than or equal to 2048"),
        ({"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
        ({"prompt": "x", "steps": 1000}, "steps", "less than or equal to 100"),
        ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "seed": "abc"}, "seed", "valid integer"),
        ({"prompt": "x", "guidance": 99}, "guidance", "less than or equal to 30"),
        ({"prompt": "x", "colour": "red"}, "colour", "unknown field"),
        ({"prompt": "x", "image": "a.png"}, "image", "takes no input image"),
        ({"prompt": "x" * 5000}, "prompt", "at most 4000"),
    ],
)
def test_every_malformed_request_names_its_field(row, field, reason):
    with pytest.raises(RequestError) as raised:
        parse(**row)
    assert raised.value.field == field
    assert reason in raised.value.reason
    assert str(raised.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("row", "field"), [({"tenant": "acme"}, "id"), ({"id": "1"}, "tenant"), ({"id": "", "tenant": "a"}, "id")])
def test_missing_identity_fields(row, field):
    with pytest.raises(RequestError) as raised:
        parse_request(row | {"prompt": "x"}, DEFAULTS)
    assert raised.value.field == field


@pytest.mark.parametrize("field", ["tenant", "region", "adapter"])
@pytest.mark.parametrize("value", ["../other-tenant/x", "/etc/passwd", "a/b", "..", "a b"])
def test_names_are_never_paths(field, value):
    row = {"id": "r1", "tenant": "acme", "prompt": "x"} | {field: value}
    with pytest.raises(RequestError) as raised:
        parse_request(row, DEFAULTS)
    assert raised.value.field == field


def test_ids_may_hold_slashes_but_not_control_characters():
    assert parse(id="sku/123", prompt="x").id == "sku/123"
    with pytest.raises(RequestError, match="control characters"):
        parse(id="a\nb", prompt="x")
