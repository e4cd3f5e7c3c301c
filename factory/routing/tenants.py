"""The tenant registry: which LoRA adapter a row gets, from its tenant, region and explicit adapter name.

File format (YAML; unknown keys are errors)::

    tenants:
      acme:
        default: brand                 # optional; rows with no (known) region get this adapter
        adapters:
          brand:
            uri: adapters/acme-brand.safetensors   # local path relative to this file's folder, or s3://
            scale: 1.0                             # optional, 0 < scale <= 4
            sha256: 9f86d0...                      # optional; the file must match it
          eu-minimal:
            uri: s3://bucket/acme/eu-minimal.safetensors
        regions:                       # optional; region name -> adapter name
          eu: eu-minimal
          na: brand
        inputs: [s3://bucket/acme/, data/acme/]   # optional; where its rows' images may be (factory.io.roots)
      globex: {}                       # a known tenant that always gets the base model

Resolution of `resolve_adapter(tenant, region, adapter)`, first match wins:

1. `adapter` given: the tenant's adapter of that name (`base` means the base model, explicitly); a name the
   tenant does not have is an error -- an explicit request is never silently replaced;
2. `region` mapped in the tenant's `regions`: that adapter;
3. the tenant's `default` adapter (this covers an unknown or missing region);
4. the base model (None).

An unknown tenant is an error. Every error is a `TenantError` (an `InputError`) carrying the row field it
blames, so the job rejects that row. Tenant, region and adapter names match the manifest's name rule: they
are names, never paths (`../x`, `/etc/passwd` are refused), and `base` is reserved.

A tenant's `inputs` are the roots its rows' and requests' images must lie under (local folders relative to this
file's folder, s3:// or http(s):// prefixes); a job adds its own `input_roots`, and the online API may only narrow
them with `api.input_prefixes`. A tenant with none reads what its job allows (see
factory.jobs.sources.manifests.validate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.errors import ConfigError, InputError, one_line, validation_problems
from factory.io.roots import normalise_root
from factory.model.lora.ref import BASE_ADAPTER, SHA256_PATTERN, AdapterRef
from factory.routing.requests import NAME_PATTERN

log = structlog.get_logger(__name__)

_ALLOWED_SCHEMES = ("s3://", "file://")


class TenantError(InputError):
    """A row's tenant/region/adapter cannot be resolved; `field` names the row field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def is_name(value: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(value)) and set(value) != {"."}


def _check_name(value: str, what: str) -> str:
    if not is_name(value):
        raise ValueError(f"{what} {value!r} must be a name of letters, digits, '.', '_' or '-' (not a path)")
    return value


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, description="Local path (relative to the registry file) or s3:// URI")
    scale: float = Field(default=1.0, gt=0.0, le=4.0, description="LoRA strength")
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN, description="Expected file digest, hex")

    @field_validator("uri")
    @classmethod
    def _local_or_s3(cls, value: str) -> str:
        if "://" in value and not value.startswith(_ALLOWED_SCHEMES):
            raise ValueError("must be a local path, file:// or s3:// URI")
        return value


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str | None = Field(default=None, description="Adapter for rows without a mapped region")
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    regions: dict[str, str] = Field(default_factory=dict, description="Region name -> adapter name")
    inputs: list[str] = Field(
        default_factory=list,
        description="Roots the tenant's images must lie under: local folders (relative to the registry file), "
        "s3://bucket/prefix/ or http(s)://host/prefix/; a row or request naming an image elsewhere is refused",
    )

    @field_validator("inputs")
    @classmethod
    def _roots(cls, value: list[str]) -> list[str]:
        for root in value:
            normalise_root(root, "/")  # checked here; made absolute against the registry's folder when loaded
        return value

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, AdapterSpec]) -> dict[str, AdapterSpec]:
        for name in value:
            _check_name(name, "adapter name")
            if name == BASE_ADAPTER:
                raise ValueError(f"adapter name {BASE_ADAPTER!r} is reserved for the base model")
        return value

    @field_validator("regions")
    @classmethod
    def _region_names(cls, value: dict[str, str]) -> dict[str, str]:
        for region in value:
            _check_name(region, "region name")
        return value

    @model_validator(mode="after")
    def _references_exist(self) -> TenantSpec:
        known = ", ".join(sorted(self.adapters)) or "none"
        if self.default is not None and self.default not in self.adapters:
            raise ValueError(f"default: unknown adapter {self.default!r} (known: {known})")
        for region, name in self.regions.items():
            if name not in self.adapters:
                raise ValueError(f"regions.{region}: unknown adapter {name!r} (known: {known})")
        return self


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: dict[str, TenantSpec] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for tenant in value:
            _check_name(tenant, "tenant name")
        return value


class TenantRegistry:
    """Resolved adapters of every tenant; immutable once built."""

    def __init__(self, spec: RegistryFile, base_dir: Path, source: str = "<registry>") -> None:
        self.source = source
        self._tenants = spec.tenants
        self._refs: dict[str, AdapterRef] = {}
        self._inputs = {tenant: tuple(normalise_root(root, str(base_dir)) for root in tenant_spec.inputs)
                        for tenant, tenant_spec in spec.tenants.items()}
        for tenant, tenant_spec in spec.tenants.items():
            for name, adapter in tenant_spec.adapters.items():
                self._refs[f"{tenant}/{name}"] = AdapterRef(
                    key=f"{tenant}/{name}", uri=_absolute(adapter.uri, base_dir), scale=adapter.scale,
                    sha256=adapter.sha256,
                )

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path = ".", source: str = "<registry>") -> TenantRegistry:
        try:
            spec = RegistryFile.model_validate(data if data is not None else {})
        except ValidationError as error:
            raise ConfigError(f"{source}: {one_line(validation_problems(error))}") from None
        return cls(spec, Path(base_dir), source)

    @classmethod
    def from_file(cls, path: str | Path) -> TenantRegistry:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the tenant registry ({error.strerror or error})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        registry = cls.from_dict(data, path.resolve().parent, str(path))
        log.info("tenant registry loaded", path=str(path), tenants=len(registry.tenants),
                 adapters=len(registry.adapters()))
        return registry

    @property
    def tenants(self) -> list[str]:
        return sorted(self._tenants)

    def input_roots(self, tenant: str) -> tuple[str, ...]:
        """The roots the registry gives `tenant`'s images (normalised; none for a tenant it does not name)."""
        return self._inputs.get(tenant, ())

    def adapters(self) -> list[AdapterRef]:
        return [self._refs[key] for key in sorted(self._refs)]

    def lookup(self, key: str) -> AdapterRef | None:
        """The adapter for a multiplexed model id (`tenant/adapter`); None for `base`."""
        if key == BASE_ADAPTER:
            return None
        try:
            return self._refs[key]
        except KeyError:
            raise TenantError("adapter", f"unknown adapter key {key!r}") from None

    def resolve_adapter(self, tenant: str, region: str | None = None, adapter: str | None = None) -> AdapterRef | None:
        """The adapter a row runs with (None: the base model). See the module docstring for the rule."""
        for field, value in (("tenant", tenant), ("region", region), ("adapter", adapter)):
            if value is not None and not is_name(value):
                raise TenantError(field, f"{value!r} is not a name (letters, digits, '.', '_', '-'; no paths)")
        spec = self._tenants.get(tenant)
        if spec is None:
            raise TenantError("tenant", f"unknown tenant {tenant!r}")
        if adapter is not None:
            if adapter == BASE_ADAPTER:
                return None
            if adapter not in spec.adapters:
                known = ", ".join(sorted(spec.adapters)) or "none"
                raise TenantError("adapter", f"tenant {tenant!r} has no adapter {adapter!r} (known: {known})")
            return self._refs[f"{tenant}/{adapter}"]
        name = spec.regions.get(region) if region is not None else None
        name = name or spec.default
        return self._refs[f"{tenant}/{name}"] if name else None


def resolve_adapter(
    registry: TenantRegistry | None, tenant: str, region: str | None = None, adapter: str | None = None
) -> AdapterRef | None:
    """Like `TenantRegistry.resolve_adapter`; without a registry every row runs the base model, and a row that
    asks for a named adapter is refused rather than silently run without it."""
    if registry is not None:
        return registry.resolve_adapter(tenant, region, adapter)
    if adapter is not None and adapter != BASE_ADAPTER:
        raise TenantError("adapter", f"adapter {adapter!r} requested but no tenant registry is configured")
    return None


def _absolute(uri: str, base_dir: Path) -> str:
    if uri.startswith("s3://"):
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())
