"""Registering a trained adapter in a tenants registry YAML (the file `factory.routing.tenants` reads).

The adapter is added under its tenant with its sha256 (so a replica refuses any other bytes at that URI), as the
tenant's adapter for its region, or as the tenant's default when it has none. Registering the same file again
changes nothing; an adapter name the tenant already uses for another file is refused, and nothing is written.
The new registry is validated as the routing layer will read it and then replaces the old one in one rename:
a reader sees the old file or the new one, never a half. Comments in the YAML are not kept (PyYAML drops them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from factory.errors import ConfigError, one_line, validation_problems
from factory.io.storage import Storage, is_s3
from factory.routing.tenants import RegistryFile, TenantRegistry


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register_adapter(registry: str | Path, *, tenant: str, adapter: str, uri: str, sha256: str,
                     region: str | None = None) -> bool:
    """Add `tenant/adapter` -> `uri` (local path or s3://) to the registry at `registry` (created if absent).
    True if the file changed, False if this exact adapter was already registered there."""
    path = Path(registry)
    data = _read(path)
    entry = data.setdefault("tenants", {}).get(tenant) or {}
    data["tenants"][tenant] = entry
    adapters = entry.setdefault("adapters", {})
    stored_uri = uri if is_s3(uri) else os.path.relpath(os.path.abspath(uri), path.resolve().parent)
    existing = adapters.get(adapter)
    if existing is not None and not _same_file(existing, path, uri, sha256):
        raise _taken(path, tenant, adapter, existing)
    changed = existing is None or existing.get("sha256") != sha256
    adapters[adapter] = {**(existing or {}), "uri": stored_uri, "sha256": sha256}
    if region is not None:
        changed |= entry.setdefault("regions", {}).get(region) != adapter
        entry["regions"][region] = adapter
    else:
        changed |= entry.get("default") != adapter
        entry["default"] = adapter
    if not changed:
        return False
    TenantRegistry.from_dict(data, path.resolve().parent, str(path))  # exactly as a job will read it
    Storage().write_bytes(str(path), yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())
    return True


def register_file(registry: str | Path, *, tenant: str, adapter: str, uri: str,
                  region: str | None = None) -> tuple[bool, str]:
    """`factory lora register`: an existing adapter file (its header read to be sure it is a safetensors LoRA)
    registered with the sha256 of its bytes. (changed, sha256)."""
    from factory.model.lora.header import read_shape

    storage = Storage()
    location = uri if is_s3(uri) else os.path.abspath(uri)
    read_shape(location, storage if is_s3(uri) else None)
    sha256 = hashlib.sha256(storage.read_bytes(location)).hexdigest()
    return register_adapter(registry, tenant=tenant, adapter=adapter, uri=location, sha256=sha256,
                            region=region), sha256


def check_name_free(registry: str | Path, *, tenant: str, adapter: str, uri: str) -> None:
    """Before training: refuse a name the tenant already gives a file at another URI (at the same URI, the
    sha256 decides once the adapter exists)."""
    path = Path(registry)
    existing = ((_read(path)["tenants"].get(tenant) or {}).get("adapters") or {}).get(adapter)
    if existing is not None and not _same_place(path, str(existing.get("uri", "")), uri):
        raise _taken(path, tenant, adapter, existing)


def _taken(path: Path, tenant: str, adapter: str, existing: dict[str, Any]) -> ConfigError:
    return ConfigError(f"{path}: tenant {tenant!r} already has an adapter {adapter!r} with another file "
                       f"({existing.get('uri')}, sha256 {existing.get('sha256') or 'not pinned'}); "
                       "choose another adapter name")


def _local(registry: Path, uri: str) -> Path:
    return (Path(uri) if os.path.isabs(uri) else registry.resolve().parent / uri).resolve()


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"tenants": {}}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the tenant registry ({error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        RegistryFile.model_validate(data)  # a broken registry is reported, never rewritten
    except ValidationError as error:
        raise ConfigError(f"{path}: {one_line(validation_problems(error))}") from None
    return data


def _same_place(registry: Path, stored: str, uri: str) -> bool:
    if is_s3(stored) or is_s3(uri):
        return stored == uri
    return _local(registry, stored) == Path(uri).resolve()


def _same_file(existing: dict[str, Any], registry: Path, uri: str, sha256: str) -> bool:
    if existing.get("sha256"):
        return existing["sha256"] == sha256
    stored = str(existing.get("uri", ""))
    if not _same_place(registry, stored, uri):
        return False
    return is_s3(uri) or (_local(registry, stored).exists() and file_sha256(_local(registry, stored)) == sha256)
