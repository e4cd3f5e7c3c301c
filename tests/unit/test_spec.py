"""Job specs: loading, path resolution, --set overrides and one-line errors naming the dotted key."""

from __future__ import annotations

import os
import textwrap

import pytest
from pydantic import BaseModel

from factory.errors import ConfigError
from factory.jobs.spec import Defaults, ErrorBudget, JobSpec, ServeConfig, load_spec

SPEC = """\
name: catalog-demo
inputs:
  - data/rows.jsonl
  - s3://bucket/manifests/
  - /abs/more.csv
output: out/catalog
defaults:
  steps: 4
  width: 256
serve:
  replicas: 1
tenants: tenants.yaml
"""


@pytest.fixture
def spec_file(tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    path = folder / "catalog.yaml"
    path.write_text(SPEC)
    monkeypatch.chdir(tmp_path / "jobs")  # a different folder from where the spec is loaded below
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return path


def write(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_spec_with_defaults_and_resolved_paths(spec_file, tmp_path):
    spec = load_spec(spec_file)
    assert spec.name == "catalog-demo"
    # Inputs and the tenants file are relative to the spec's folder; the output to the working directory.
    assert spec.inputs == [str(tmp_path / "jobs/data/rows.jsonl"), "s3://bucket/manifests/", "/abs/more.csv"]
    assert spec.output == str(tmp_path / "work/out/catalog")
    assert spec.tenants == str(tmp_path / "jobs/tenants.yaml")
    assert spec.profile == "tiny" and spec.allow_http is False
    assert spec.safety.action == "block" and spec.safety.detector == "nudenet"
    assert spec.defaults == Defaults(steps=4, width=256)
    assert spec.serve == ServeConfig()
    assert (spec.serve.max_ongoing_requests, spec.serve.batch_wait_timeout_s) == (8, 0.05)
    assert (spec.in_flight, spec.chunk_rows, spec.adapter_window, spec.retry_failed) == (8, 4096, None, True)
    assert (spec.retry.attempts, spec.serve.app_name, spec.serve.keep_warm) == (4, None, False)
    assert spec.error_budget == ErrorBudget(max_failed=None, max_failed_fraction=0.1)


def test_s3_output_is_kept(tmp_path):
    spec = load_spec(write(tmp_path, "name: j\ninputs: [m.csv]\noutput: s3://bucket/out\n"))
    assert spec.output == "s3://bucket/out"


def test_overrides_apply_before_validation(spec_file):
    spec = load_spec(
        spec_file,
        [
            "serve.replicas=2",
            "serve.num_cpus=0.5",
            "allow_http=true",
            "defaults.height=512",
            "error_budget.max_failed=3",
            "safety.action=quarantine",
            "safety.thresholds={FACE_FEMALE: 0.6}",
            "name=other-name",
            "tenants=",
        ],
    )
    assert spec.serve.replicas == 2 and spec.serve.num_cpus == 0.5
    assert spec.allow_http is True
    assert spec.defaults.height == 512 and spec.defaults.width == 256  # the rest of the section stays
    assert spec.error_budget.max_failed == 3
    assert spec.safety.action == "quarantine" and spec.safety.thresholds == {"FACE_FEMALE": 0.6}
    assert spec.name == "other-name" and spec.tenants is None


def test_override_that_fixes_an_invalid_file(tmp_path):
    path = write(tmp_path, "name: j\ninputs: [m.csv]\noutput: o\nserve: {replicas: 0}\n")
    with pytest.raises(ConfigError):
        load_spec(path)
    assert load_spec(path, ["serve.replicas=3"]).serve.replicas == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("serve.replcas=2", "--set serve.replcas: unknown field (did you mean serve.replicas?)"),
        ("serve.replcas.x=2", "--set serve.replcas.x: unknown field serve.replcas (did you mean serve.replicas?)"),
        ("replicas=2", "--set replicas: unknown field"),
        ("safety.anything=1", "--set safety.anything: unknown field"),
        ("name.first=x", "name is a value, not a section"),
        ("serve.replicas", "expected key=value"),
        ("serve.replicas=[1", "value is not valid YAML"),
    ],
)
def test_bad_overrides(spec_file, override, message):
    if message is None:  # under a free-form section any key is allowed
        load_spec(spec_file, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_spec(spec_file, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("serve.replicas=0", "serve.replicas: Input should be greater than or equal to 1"),
        ("defaults.width=100", "defaults.width: Input should be a multiple of 16"),
        ("error_budget.max_failed_fraction=2", "error_budget.max_failed_fraction: Input should be less than"),
        ("in_flight=lots", "in_flight: Input should be a valid integer"),
        ("name=Bad Name", "name: must be a slug"),
        ("inputs=[]", "inputs: List should have at least 1 item"),
        ("inputs=[http://example.com/m.jsonl]", "inputs[0]: must be a local path or an s3:// URI"),
    ],
)
def test_bad_values_name_the_dotted_key(spec_file, override, message):
    with pytest.raises(ConfigError) as err:
        load_spec(spec_file, [override])
    text = str(err.value)
    assert text.startswith(f"{spec_file}: ")
    assert message in text
    assert "\n" not in text


def test_unknown_keys_in_the_file_are_named(tmp_path):
    path = write(
        tmp_path,
        """\
        name: j
        inputs: [m.csv]
        output: o
        serve:
          replcas: 2
        in_fligth: 3
        """,
    )
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    text = str(err.value)
    assert "serve.replcas: unknown field (did you mean serve.replicas?)" in text
    assert "in_fligth: unknown field (did you mean in_flight?)" in text
    assert "\n" not in text


def test_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="name: required; inputs: required; output: required"):
        load_spec(write(tmp_path, "profile: tiny\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed\n", "invalid YAML at line"),
        ("- a\n- b\n", "expected key: value pairs at the top level, got list"),
        ("", "empty spec"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_spec(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_every_field_has_a_description():
    def walk(model: type[BaseModel]):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation)

    walk(JobSpec)


def test_error_budget():
    budget = ErrorBudget(max_failed_fraction=0.1, min_rows=10)
    assert not budget.exceeded(failed=1, finished=1)  # too early to judge a fraction
    assert not budget.exceeded(failed=1, finished=10)
    assert budget.exceeded(failed=2, finished=10)
    assert ErrorBudget(max_failed=2, max_failed_fraction=1.0).exceeded(failed=3, finished=3)
    assert not ErrorBudget(max_failed=2, max_failed_fraction=1.0).exceeded(failed=2, finished=2)


def test_model_validate_without_a_file_uses_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = JobSpec.model_validate({"name": "j", "inputs": ["m.csv"], "output": "o"})
    assert spec.inputs == [os.path.join(str(tmp_path), "m.csv")]
