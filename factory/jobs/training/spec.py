"""Training specs (`factory train SPEC.yaml`): whose adapter, from which captioned images, on which profile,
written where, and how it is trained. Every field is typed and described; an unknown key or an impossible value
is one `ConfigError` line naming it, as in every factory spec (`factory.jobs.spec`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.errors import ConfigError, Loc, one_line, validation_problems
from factory.jobs.spec import _CONTEXT_SPEC_DIR, _input_from_spec_dir, _model_at, _resolve_location, _suggest, \
    _yaml_where
from factory.model.lora.ref import BASE_ADAPTER
from factory.model.profiles import get_profile
from factory.model.training.options import TrainOptions
from factory.routing.tenants import is_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _name(value: str) -> str:
    if not is_name(value):
        raise ValueError(f"{value!r} must be a name of letters, digits, '.', '_' or '-' (not a path)")
    return value


Name = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_name)]


class Scaling(_Section):
    """Ray Train's `ScalingConfig`: data-parallel workers, one per GPU (DDP, NCCL) or per CPU slot (gloo)."""

    workers: int = Field(default=1, ge=1, le=1024, description="Training workers; options.batch_size is split "
                         "evenly between them")
    use_gpu: bool | None = Field(default=None, description="One GPU per worker; unset: when the profile runs on "
                                 "a GPU")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each worker reserves (torch uses as many "
                                   "threads)")


class Encoding(_Section):
    """Stage 1: Ray Data actors holding only the VAE and text encoders, each image and caption encoded once."""

    actors: int = Field(default=1, ge=1, le=256, description="Encoder actors (each loads the encoders once)")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Images handed to an actor per call")
    chunk_images: int = Field(default=64, ge=1, le=100_000, description="Images (with their captions) one read "
                              "task decodes and resizes; a tar shard is one task")


class TrainSpec(_Section):
    """One style adapter for a tenant (and region), trained from captioned images."""

    tenant: Name = Field(description="Tenant the adapter is trained for and registered under")
    region: Name | None = Field(default=None, description="Region the adapter styles; registered as the tenant's "
                                "adapter for that region. Unset: registered as the tenant's default adapter")
    adapter: Name = Field(description="Adapter name in the tenant's registry entry (a name, not a path)")
    sources: list[Annotated[str, Field(min_length=1), AfterValidator(_input_from_spec_dir)]] = Field(
        min_length=1,
        description="Captioned images: folders and s3:// prefixes of images with a .txt, .caption or .json "
        "caption beside each (a `factory caption --sidecars` run's dataset/ folder is one), tar shards in the "
        "WebDataset layout (brace patterns such as shard-{000..009}.tar), or a caption run's results (a .parquet "
        "file, or its results/ folder); relative paths are relative to the spec file's folder",
    )
    profile: str = Field(default="tiny", min_length=1, description="Model profile whose transformer is trained "
                         "(a FLUX.1 profile; see factory.model.profiles)")
    output: str = Field(min_length=1, description="Folder or s3:// prefix; the run writes OUTPUT/<run id>/ (a "
                        "relative path is relative to the working directory)")
    run_id: Name | None = Field(default=None, description="Names the run under output; the same id resumes it. "
                                "Unset: <tenant>-<adapter>-<digest of sources, profile and options>")
    format: Literal["diffusers", "kohya"] = Field(
        default="diffusers", description="Adapter file layout: diffusers/peft (what diffusers' training scripts "
        "write) or kohya keys (lora_down/lora_up, read back by diffusers' converter)")
    registry: str | None = Field(default=None, description="Tenants registry YAML the adapter is registered in "
                                 "(`factory train --register`); relative to the spec file's folder")
    options: TrainOptions = Field(default_factory=TrainOptions, description="How the adapter is trained")
    scaling: Scaling = Field(default_factory=Scaling, description="Training workers (Ray Train ScalingConfig)")
    encoding: Encoding = Field(default_factory=Encoding, description="The encode-once stage (Ray Data)")

    @field_validator("adapter")
    @classmethod
    def _not_base(cls, value: str) -> str:
        if value == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for the base model")
        return value

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
        try:
            profile = get_profile(value)
        except ConfigError as error:  # its line names the known profiles
            raise ValueError(str(error).removeprefix("profile: ")) from None
        if profile.generator.family != "flux1":
            raise ValueError(f"profile {value!r} runs {profile.generator.family}; training supports FLUX.1 "
                             "profiles (FluxTransformer2DModel)")
        return value

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainSpec:
        if self.options.batch_size % self.scaling.workers:
            raise ValueError(f"options.batch_size: {self.options.batch_size} is not a multiple of scaling.workers "
                             f"({self.scaling.workers})")
        return self

    @property
    def fingerprint(self) -> str:
        """A digest of what decides the adapter: sources, profile and every training option (cadences too, so a
        resumed run never mixes two settings)."""
        decisive = {"sources": self.sources, "profile": self.profile, "options": self.options.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()

    @property
    def resolved_run_id(self) -> str:
        return self.run_id or f"{self.tenant}-{self.adapter}-{self.fingerprint[:8]}"

    def uses_gpu(self) -> bool:
        return self.scaling.use_gpu if self.scaling.use_gpu is not None else get_profile(self.profile).wants_gpu


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
