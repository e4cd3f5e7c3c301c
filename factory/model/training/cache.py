"""The training cache: one Parquet row per captioned image, holding what the transformer reads (VAE latents,
prompt embeddings, pooled embedding) as float32 bytes with their shapes, and what identifies the image (its id,
source, caption and the sha256 of its bytes). Written by the encode stage, read by every training worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from factory.model.training.encoders import EncodedSample

if TYPE_CHECKING:
    import torch

_TENSORS = ("latents", "prompt_embeds", "pooled_embeds")

CACHE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source_uri", pa.string()), ("caption", pa.string()), ("image_sha256", pa.string()),
     ("bucket_width", pa.int32()), ("bucket_height", pa.int32())]
    + [field for name in _TENSORS for field in ((name, pa.binary()), (f"{name}_shape", pa.list_(pa.int32())))]
)


def cache_row(meta: dict[str, Any], encoded: EncodedSample) -> dict[str, Any]:
    """One cache row: `meta` (id, source_uri, caption, image_sha256, bucket_width, bucket_height) + tensors."""
    row = {name: meta[name] for name in CACHE_SCHEMA.names if name in meta}
    for name in _TENSORS:
        array = np.ascontiguousarray(getattr(encoded, name), dtype="<f4")
        row[name], row[f"{name}_shape"] = array.tobytes(), list(array.shape)
    return row


@dataclass(frozen=True)
class CachedSample:
    id: str
    caption: str
    image_sha256: str
    bucket: tuple[int, int]  # (width, height)
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor


def _tensor(data: bytes, shape: list[int]) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(shape).copy())


def read_samples(table: pa.Table) -> list[CachedSample]:
    """Cache rows as tensors, sorted by id: the order every worker agrees on, whatever order the shards came in."""
    rows = sorted(table.to_pylist(), key=lambda row: row["id"])
    return [
        CachedSample(
            id=row["id"], caption=row["caption"], image_sha256=row["image_sha256"],
            bucket=(row["bucket_width"], row["bucket_height"]),
            **{name: _tensor(row[name], row[f"{name}_shape"]) for name in _TENSORS},
        )
        for row in rows
    ]
