"""Training specs: `factory train SPEC.yaml` files, and what every training job derives from its `train:` section.

A training spec is a job spec's `train:` section (`factory.jobs.spec.TrainSection`) with the few keys a job spec
says around it (profile, output, run id, registry) at its top level; `TrainSpec.job()` is the job spec
`factory train` runs, through the one run driver (`factory.jobs.run.run_job`), as `factory run` runs a job spec
with a `train:` section. An unknown key or an impossible value is one `ConfigError` line naming it, as in every
factory spec.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from factory.errors import ConfigError, Loc, one_line, validation_problems
from factory.jobs.spec import (
    _CONTEXT_SPEC_DIR, JobSpec, Name, TrainSection, _input_from_spec_dir, _model_at, _resolve_location, _suggest,
    _yaml_where, check_trainable_profile,
)
from factory.model.profiles import get_profile
from factory.model.training.options import Bucket

JOB_NAME = "train"  # the job name of `factory train` runs (their run id says whose adapter)


class TrainSpec(TrainSection):
    """One style adapter for a tenant (and region), trained from captioned images: a `train:` section with the job
    keys it needs."""

    profile: str = Field(default="tiny", min_length=1, description="Model profile whose transformer is trained "
                         "(a FLUX.1 profile; see factory.model.profiles)")
    output: str = Field(min_length=1, description="Folder or s3:// prefix; the run writes OUTPUT/<run id>/ (a "
                        "relative path is relative to the working directory)")
    run_id: Name | None = Field(default=None, description="Names the run under output; the same id resumes it. "
                                "Unset: <tenant>-<adapter>-<digest of sources, profile and options>")
    registry: str | None = Field(default=None, description="Tenants registry YAML the adapter is registered in "
                                 "(`register: true` or `factory train --register`); relative to the spec file's "
                                 "folder")
    revisions: dict[str, str] | None = Field(
        default=None, description="Hub revisions for the profile's checkpoints, by component, as in a job spec: "
        "resolved to commits once when the run starts")

    @field_validator("output")
    @classmethod
    def _output_from_cwd(cls, value: str) -> str:
        return _resolve_location(value, os.getcwd())  # absolute now: Ray workers do not share the driver's cwd

    @field_validator("registry")
    @classmethod
    def _registry_from_spec_dir(cls, value: str | None, info) -> str | None:
        return None if value is None else _input_from_spec_dir(value, info)

    @field_validator("profile")
    @classmethod
    def _flux1_profile(cls, value: str) -> str:
        check_trainable_profile(value)
        return value

    def job(self) -> JobSpec:
        """The job spec this training spec is: its `train:` section, profile, output and registry."""
        section = self.model_dump(include=set(TrainSection.model_fields))
        return JobSpec.model_validate({"name": JOB_NAME, "output": self.output, "profile": self.profile,
                                       "tenants": self.registry, "revisions": self.revisions, "train": section})

    @property
    def resolved_run_id(self) -> str:
        return self.run_id or f"{self.tenant}-{self.adapter}-{fingerprint(self.job())[:8]}"


def fingerprint(spec: JobSpec) -> str:
    """A digest of what decides a training job's adapter: its sources, profile and revisions (pinned, once the job
    has started) and every training option (cadences too, so a resumed run never mixes two settings)."""
    assert spec.train is not None
    decisive = {"sources": spec.train.sources, "profile": spec.profile, "revisions": spec.revisions or {},
                "options": spec.train.options.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def buckets_of(spec: JobSpec) -> list[Bucket]:
    """The training resolutions: the options' buckets, else the profile's default image size."""
    assert spec.train is not None
    generator = get_profile(spec.profile).generator
    return list(spec.train.options.buckets or (Bucket(width=generator.width, height=generator.height),))


def uses_gpu(spec: JobSpec) -> bool:
    """Whether the job's encoders and training workers take a GPU each: `scaling.use_gpu`, else the profile's."""
    assert spec.train is not None
    use_gpu = spec.train.scaling.use_gpu
    return use_gpu if use_gpu is not None else get_profile(spec.profile).wants_gpu


def load_train_spec(path: str | os.PathLike[str]) -> TrainSpec:
    """Read and validate a training spec; any problem is one `ConfigError` line naming the file and the field."""
    spec_path = Path(path)
    try:
        data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{spec_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{spec_path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{spec_path}: invalid YAML{_yaml_where(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{spec_path}: expected key: value pairs at the top level")
    try:
        return TrainSpec.model_validate(data, context={_CONTEXT_SPEC_DIR: os.path.abspath(spec_path.parent)})
    except ValidationError as exc:
        raise ConfigError(f"{spec_path}: {one_line(validation_problems(exc, _meant))}") from None


def _meant(loc: Loc) -> str:
    return _suggest(str(loc[-1]), _model_at(TrainSpec, loc[:-1]), loc[:-1])
