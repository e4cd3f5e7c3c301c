"""API keys: made once, shown once, stored only as salted hashes; a presented key maps to its tenant.

A key looks like ``fk_<id>_<secret>``: `id` is 12 hex digits that name the key in the config (and in logs), the
secret 64 hex digits (256 random bits). The config keeps ``{id, tenant, hash}`` with
``hash = "sha256$<salt hex>$<sha256(salt || secret) hex>"``. The id finds the one entry to check, so a request
costs one sha256 whatever the number of keys, and the comparison is constant-time. A slow password hash (scrypt,
argon2) buys nothing for 256-bit random secrets, which cannot be guessed, and would cost every request; the
per-key salt means two configs never share a hash for the same key.

Make one with ``factory api-key TENANT`` (prints the key, and the line for the config), or::

    python -c "from factory.routing.auth import new_key; k = new_key('acme'); print(k.key); print(k.entry)"
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.routing.requests import NAME_PATTERN

KEY_PREFIX = "fk"
_KEY = re.compile(r"fk_(?P<id>[0-9a-f]{12})_(?P<secret>[0-9a-f]{64})")
_HASH = re.compile(r"sha256\$(?P<salt>[0-9a-f]{32})\$(?P<digest>[0-9a-f]{64})")


class ApiKey(BaseModel):
    """One key as the config stores it: never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[0-9a-f]{12}$", description="The key's public id (the 12 hex digits after 'fk_')")
    tenant: str = Field(description="Tenant the key acts for")
    hash: str = Field(description="sha256$<salt hex>$<sha256(salt || secret) hex>, as `factory api-key` prints")

    @field_validator("tenant")
    @classmethod
    def _tenant_is_a_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value) or set(value) == {"."}:
            raise ValueError(f"{value!r} must be a tenant name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("hash")
    @classmethod
    def _hash_shape(cls, value: str) -> str:
        if not _HASH.fullmatch(value):
            raise ValueError("must be sha256$<32 hex salt>$<64 hex digest> (see `factory api-key`); never a plain key")
        return value


class NewKey(BaseModel):
    key: str
    entry: ApiKey


def hash_secret(secret: str, salt: bytes) -> str:
    return f"sha256${salt.hex()}${hashlib.sha256(salt + secret.encode()).hexdigest()}"


def new_key(tenant: str) -> NewKey:
    """A fresh key for `tenant`, and the config entry that accepts it."""
    key_id, secret = secrets.token_hex(6), secrets.token_hex(32)
    entry = ApiKey(id=key_id, tenant=tenant, hash=hash_secret(secret, secrets.token_bytes(16)))
    return NewKey(key=f"{KEY_PREFIX}_{key_id}_{secret}", entry=entry)


class Keyring:
    """The configured keys, by id. `tenant_of(key)` is None for anything that is not a configured key."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_id: dict[str, tuple[str, bytes, bytes]] = {}
        for entry in keys:
            if entry.id in self._by_id:
                raise ValueError(f"api.keys: key id {entry.id} is listed twice")
            found = _HASH.fullmatch(entry.hash)
            assert found is not None  # ApiKey checked it
            self._by_id[entry.id] = (entry.tenant, bytes.fromhex(found["salt"]), bytes.fromhex(found["digest"]))

    def __len__(self) -> int:
        return len(self._by_id)

    def tenant_of(self, key: str | None) -> str | None:
        found = _KEY.fullmatch(key or "")
        if found is None:
            return None
        stored = self._by_id.get(found["id"])
        if stored is None:
            return None
        tenant, salt, digest = stored
        presented = hashlib.sha256(salt + found["secret"].encode()).digest()
        return tenant if hmac.compare_digest(presented, digest) else None


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key of a request: `Authorization: Bearer <key>` or `X-API-Key: <key>` (HTTP headers or gRPC metadata)."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None
