"""What an adapter file's safetensors header says about it, without reading its tensors.

A replica with a compiled transformer must enable hot-swap at the largest rank of every adapter its job may
use before loading the first one; reading each header (a ranged read of a few kilobytes) answers that without
downloading every adapter at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from factory.model.lora.safe_load import DEFAULT_MAX_HEADER_BYTES, AdapterError, header_json

# The down-projection of a pair in every layout diffusers converts: peft `lora_A`, kohya `lora_down`,
# ai-toolkit / XLabs `lora.down`; its first dimension is the rank.
_DOWN = re.compile(r"(lora_A|lora_down|lora\.down)(\.[A-Za-z0-9_]+)?\.weight$")


@dataclass(frozen=True)
class AdapterShape:
    uri: str
    max_rank: int
    pairs: int  # LoRA pairs (layers) the file holds: a rough measure of how many layers it targets


def read_shape(uri: str, source: Any = None, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> AdapterShape:
    """Largest rank and number of pairs, from the header; refuses a file that is not safetensors."""
    head = _read(uri, source, 0, 8)
    if len(head) < 8:
        raise AdapterError(f"{uri}: not a safetensors file (shorter than its 8-byte header length)")
    length = int.from_bytes(head, "little")
    if length < 2 or length > max_header_bytes:
        raise AdapterError(f"{uri}: not a safetensors file (header length {length})")
    header = header_json(_read(uri, source, 8, 8 + length), uri)
    ranks = [
        int(entry["shape"][0]) for name, entry in header.items()
        if name != "__metadata__" and _DOWN.search(name) and isinstance(entry, dict)
        and isinstance(entry.get("shape"), list) and len(entry["shape"]) == 2
    ]
    if not ranks:
        raise AdapterError(f"{uri}: holds no LoRA weights")
    return AdapterShape(uri, max(ranks), len(ranks))


def _read(uri: str, source: Any, start: int, end: int) -> bytes:
    opener = getattr(source, "open_range", None)
    try:
        if opener is not None:
            with opener(uri, start, end) as stream:
                return stream.read()
        with open(uri.removeprefix("file://"), "rb") as stream:
            stream.seek(start)
            return stream.read(end - start)
    except AdapterError:
        raise
    except FileNotFoundError:
        raise AdapterError(f"{uri}: no such file") from None
    except Exception as error:  # noqa: BLE001 - storage errors differ by backend; each means "cannot read"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise AdapterError(f"{uri}: cannot read its header ({reason})") from None

