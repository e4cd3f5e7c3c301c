"""The tenant registry: file validation, the resolution rule, and names that are never paths."""

from __future__ import annotations

import hashlib

import pytest

from factory.errors import ConfigError, InputError
from factory.model.lora.ref import BASE_ADAPTER
from factory.routing.tenants import TenantError, TenantRegistry, resolve_adapter

DIGEST = hashlib.sha256(b"x").hexdigest()

REGISTRY_YAML = f"""
tenants:
  acme:
    default: brand
    adapters:
      brand: {{uri: adapters/acme-brand.safetensors, scale: 0.8, sha256: {DIGEST}}}
      eu-minimal: {{uri: s3://bucket/acme/eu.safetensors}}
    regions:
      eu: eu-minimal
      na: brand
  globex:
    adapters:
      summer: {{uri: /abs/globex-summer.safetensors}}
    regions:
      apac: summer
  initech: {{}}
"""


@pytest.fixture
def registry(tmp_path) -> TenantRegistry:
    path = tmp_path / "tenants.yaml"
    path.write_text(REGISTRY_YAML)
    return TenantRegistry.from_file(path)


def test_file_is_parsed_into_refs_with_stable_keys_and_absolute_uris(registry, tmp_path):
    brand = registry.resolve_adapter("acme", adapter="brand")
    assert brand is not None
    assert brand.key == "acme/brand" and brand.scale == 0.8 and brand.sha256 == DIGEST
    assert brand.uri == str((tmp_path / "adapters" / "acme-brand.safetensors").resolve())
    assert registry.lookup("acme/eu-minimal").uri == "s3://bucket/acme/eu.safetensors"
    assert registry.lookup(BASE_ADAPTER) is None
    assert [ref.key for ref in registry.adapters()] == ["acme/brand", "acme/eu-minimal", "globex/summer"]
    assert registry.tenants == ["acme", "globex", "initech"]
    # The diffusers adapter name is a sanitised key: no '/' or '.', and distinct keys stay distinct.
    names = {ref.adapter_name for ref in registry.adapters()}
    assert len(names) == 3 and all("/" not in n and "." not in n for n in names)


@pytest.mark.parametrize(
    ("tenant", "region", "adapter", "expected"),
    [
        ("acme", "eu", None, "acme/eu-minimal"),  # region mapping
        ("acme", "na", None, "acme/brand"),
        ("acme", "eu", "brand", "acme/brand"),  # an explicit adapter wins over the region
        ("acme", "mars", None, "acme/brand"),  # unknown region -> tenant default
        ("acme", None, None, "acme/brand"),  # no region -> tenant default
        ("acme", "eu", BASE_ADAPTER, None),  # explicit base model
        ("globex", "apac", None, "globex/summer"),
        ("globex", "eu", None, None),  # unknown region, no default -> base model
        ("initech", "eu", None, None),  # a tenant without adapters -> base model
    ],
)
def test_resolution_rule(registry, tenant, region, adapter, expected):
    ref = registry.resolve_adapter(tenant, region, adapter)
    assert (ref.key if ref else None) == expected


def test_unknown_tenant_and_unknown_adapter_are_row_errors_naming_the_field(registry):
    with pytest.raises(TenantError, match="unknown tenant 'umbrella'") as error:
        registry.resolve_adapter("umbrella", "eu")
    assert error.value.field == "tenant" and isinstance(error.value, InputError)
    known = r"tenant 'acme' has no adapter 'summer' \(known: brand, eu-minimal\)"
    with pytest.raises(TenantError, match=known) as error:
        registry.resolve_adapter("acme", adapter="summer")  # another tenant's adapter is not borrowed
    assert error.value.field == "adapter"
    with pytest.raises(TenantError):
        registry.lookup("acme/nope")


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("adapter", {"tenant": "acme", "adapter": "../globex/summer"}),
        ("adapter", {"tenant": "acme", "adapter": "/etc/passwd"}),
        ("adapter", {"tenant": "acme", "adapter": ".."}),
        ("tenant", {"tenant": "../acme"}),
        ("region", {"tenant": "acme", "region": "eu/../na"}),
    ],
)
def test_path_like_names_are_refused(registry, field, kwargs):
    with pytest.raises(TenantError) as error:
        registry.resolve_adapter(**kwargs)
    assert error.value.field == field and "not a name" in str(error.value)


def test_without_a_registry_rows_run_the_base_model_and_named_adapters_are_refused():
    assert resolve_adapter(None, "anyone", "eu") is None
    assert resolve_adapter(None, "anyone", adapter=BASE_ADAPTER) is None
    with pytest.raises(TenantError, match="no tenant registry"):
        resolve_adapter(None, "anyone", adapter="brand")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tenants": {"acme": {"adapters": {"a": {"uri": "a.safetensors", "color": "red"}}}}},
         "tenants.acme.adapters.a.color: unknown field"),
        ({"tenant": {}}, "tenant: unknown field"),
        ({"tenants": {"acme": {"default": "nope", "adapters": {"a": {"uri": "a.safetensors"}}}}},
         "tenants.acme: default: unknown adapter 'nope' (known: a)"),
        ({"tenants": {"acme": {"regions": {"eu": "nope"}}}}, "tenants.acme: regions.eu: unknown adapter 'nope'"),
        ({"tenants": {"acme": {"adapters": {"a": {"uri": "a.safetensors", "scale": 9}}}}},
         "tenants.acme.adapters.a.scale: Input should be less than or equal to 4"),
        ({"tenants": {"acme": {"adapters": {"a": {"uri": "a.safetensors", "sha256": "abc"}}}}},
         "tenants.acme.adapters.a.sha256: String should match pattern"),
        ({"tenants": {"acme": {"adapters": {"a": {"uri": "https://example.com/a.safetensors"}}}}},
         "tenants.acme.adapters.a.uri: must be a local path, file:// or s3:// URI"),
        ({"tenants": {"../acme": {}}}, "tenants: tenant name '../acme' must be a name"),
        ({"tenants": {"acme": {"adapters": {"x/y": {"uri": "a.safetensors"}}}}},
         "tenants.acme.adapters: adapter name 'x/y' must be a name"),
        ({"tenants": {"acme": {"adapters": {"base": {"uri": "a.safetensors"}}}}},
         "adapter name 'base' is reserved"),
    ],
)
def test_invalid_registry_is_one_config_error_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        TenantRegistry.from_dict(data, source="tenants.yaml")
    text = str(error.value)
    assert text.startswith("tenants.yaml: ") and message in text and "\n" not in text


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        TenantRegistry.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TenantRegistry.from_file(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert TenantRegistry.from_file(empty).tenants == []
