"""The one wording of pydantic validation errors, and the same words at every place that reports them."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from factory.errors import ConfigError, Problem, one_line, validation_problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Item(_Strict):
    x: int


class Serve(_Strict):
    replicas: int = Field(default=1, ge=1)


class Doc(_Strict):
    name: str
    serve: Serve = Field(default_factory=Serve)
    items: list[Item] = Field(default_factory=list)
    slug: str = "a"

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        if " " in value:
            raise ValueError(f"must be a slug, got {value!r}")
        return value


def problems_of(data, **kwargs) -> list[Problem]:
    with pytest.raises(ValidationError) as raised:
        Doc.model_validate(data)
    return validation_problems(raised.value, **kwargs)


def test_each_kind_of_problem_in_the_same_words():
    found = problems_of({"serve": {"replicas": 0, "replcas": 2}, "items": [{"x": 1}, {"x": "abc"}],
                         "slug": "a b", "colour": "red"})
    assert {p.field: p.reason for p in found} == {
        "name": "required",
        "serve.replicas": "Input should be greater than or equal to 1, got 0",
        "serve.replcas": "unknown field",
        "items[1].x": "Input should be a valid integer, unable to parse string as an integer, got 'abc'",
        # Our own validator's words, without pydantic's "Value error, " and without a second "got".
        "slug": "must be a slug, got 'a b'",
        "colour": "unknown field",
    }


def test_only_scalar_inputs_are_shown_and_long_ones_are_cut():
    (items,) = problems_of({"name": "n", "items": {"x": 1}})
    assert items == Problem("items", "Input should be a valid list")
    (replicas,) = problems_of({"name": "n", "serve": {"replicas": "x" * 500}})
    reason, _, shown = replicas.reason.partition(", got ")
    assert reason == "Input should be a valid integer, unable to parse string as an integer"
    assert shown.startswith("'xxx") and shown.endswith("...") and len(shown) == 60


def test_a_suggestion_is_appended_to_unknown_fields_only():
    found = problems_of({"name": "n", "serve": {"replcas": 2, "replicas": 0}},
                        suggest=lambda loc: f" (did you mean {'.'.join(map(str, loc[:-1]))}.replicas?)")
    assert [str(p) for p in found] == [
        "serve.replicas: Input should be greater than or equal to 1, got 0",
        "serve.replcas: unknown field (did you mean serve.replicas?)",
    ]


def test_one_line_names_the_first_few_and_counts_the_rest():
    found = [Problem(f"f{i}", "required") for i in range(5)]
    assert one_line(found) == "f0: required; f1: required; f2: required (and 2 more)"
    assert one_line(found[:2]) == "f0: required; f1: required"
    assert one_line(found, limit=1) == "f0: required (and 4 more)"
    # A problem with the input as a whole names no field.
    (whole,) = validation_problems(pytest.raises(ValidationError, Doc.model_validate, [1]).value)
    assert whole.field == "" and str(whole) == "Input should be a valid dictionary or instance of Doc"


def test_every_caller_uses_the_same_words_for_the_same_mistake(tmp_path):
    from factory.jobs.sources.manifests.files import ManifestRecord, validate_record
    from factory.jobs.spec import load_spec
    from factory.routing.parser import GenerationDefaults, RequestError, parse_request
    from factory.routing.tenants import TenantRegistry

    spec = tmp_path / "job.yaml"
    spec.write_text("name: j\ninputs: [m.csv]\noutput: o\ncolour: red\nin_flight: 0\n")
    with pytest.raises(ConfigError) as raised:
        load_spec(spec)
    assert str(raised.value) == (
        f"{spec}: in_flight: Input should be greater than or equal to 1, got 0; colour: unknown field"
    )

    with pytest.raises(ConfigError) as raised:
        TenantRegistry.from_dict({"tenants": {"acme": {"colour": "red"}}}, source="tenants.yaml")
    assert str(raised.value) == "tenants.yaml: tenants.acme.colour: unknown field"

    row = {"id": "a", "tenant": "t", "prompt": "x", "colour": "red"}
    with pytest.raises(RequestError) as raised:
        parse_request(row, GenerationDefaults(steps=1, width=16, height=16, guidance=0.0))
    _, reject = validate_record(ManifestRecord("m.jsonl", 1, raw=row))
    assert (raised.value.field, raised.value.reason) == (reject.field, reject.reason) == ("colour", "unknown field")
