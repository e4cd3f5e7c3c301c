"""`AdapterRef`: what the model layer needs to know about one adapter, wherever it was resolved.

The tenant registry (routing layer) builds these and the LoRA pool loads them; they, and the base-model name,
live in the model layer so that every layer above can share them while `model` imports none of those.
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict, Field

# "<tenant>/<adapter>": two names, never a path (no leading '/', no '..', exactly one '/').
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

# The explicit "no adapter" name: in rows, as Serve's multiplexed model id, and reserved in tenant registries.
BASE_ADAPTER = "base"


class AdapterRef(BaseModel):
    """One LoRA adapter: a stable key, where its safetensors file is, and how strongly to apply it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(pattern=KEY_PATTERN, description="'<tenant>/<adapter>'; Serve's multiplexed model id")
    uri: str = Field(min_length=1, description="Absolute local path, file:// or s3:// URI of a .safetensors file")
    scale: float = Field(default=1.0, gt=0.0, le=4.0, description="LoRA strength (diffusers adapter weight)")
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN, description="Expected file digest (hex)")

    @property
    def adapter_name(self) -> str:
        """The name diffusers/peft know the adapter by.

        peft stores adapters in `ModuleDict`s, whose keys may not contain '.', and '/' reads badly in logs; the
        digest suffix keeps two keys that sanitise alike (`a/b-c`, `a-b/c`) from colliding.
        """
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9_]', '_', self.key)}_{digest}"

    def same_weights(self, other: AdapterRef) -> bool:
        """True when `other` loads the same file (a scale change needs no reload)."""
        return (self.uri, self.sha256) == (other.uri, other.sha256)
