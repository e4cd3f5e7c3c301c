"""Which cached samples each step trains on, as a pure function of (seed, step): the data order a resumed run
continues from without any saved sampler state, and the same global batches however many workers share them.

Every worker holds the whole cache (a LoRA data set is hundreds to a few thousand images) and takes its slice of
each global batch. An epoch shuffles each bucket, cuts it into global batches (the last one filled up by wrapping
around the bucket, so every image is seen every epoch and every batch is full), and shuffles the batches.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from factory.model.training.cache import CachedSample

if TYPE_CHECKING:
    import torch


def derived_seed(seed: int, *parts: object) -> int:
    """A seed for one purpose (an epoch's order, one sample's noise at one step), independent of the others."""
    digest = hashlib.sha256(":".join(str(part) for part in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded(seed: int, *parts: object) -> torch.Generator:
    import torch

    return torch.Generator("cpu").manual_seed(derived_seed(seed, *parts))


def held_out_digests(digests: Iterable[str], fraction: float) -> set[str]:
    """The image digests kept out of training: the smallest ones (sha256 is uniform, so this is a fixed random
    choice), at least one when `fraction` > 0; copies of one image share a digest, so they stay on one side."""
    distinct = sorted(set(digests))
    if fraction <= 0 or not distinct:
        return set()
    return set(distinct[:max(1, round(fraction * len(distinct)))])


def split_held_out(samples: list[CachedSample], fraction: float) -> tuple[list[CachedSample], list[CachedSample]]:
    """(train, held out) by `held_out_digests`."""
    held = held_out_digests((sample.image_sha256 for sample in samples), fraction)
    return ([s for s in samples if s.image_sha256 not in held], [s for s in samples if s.image_sha256 in held])


@dataclass(frozen=True)
class BatchPlan:
    """Global batches of indices into `samples`, step by step."""

    buckets: tuple[tuple[int, ...], ...]  # indices of the samples of each bucket, buckets in a fixed order
    batch_size: int
    seed: int

    @classmethod
    def of(cls, samples: list[CachedSample], batch_size: int, seed: int) -> BatchPlan:
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, sample in enumerate(samples):
            by_bucket[sample.bucket].append(index)
        return cls(tuple(tuple(by_bucket[key]) for key in sorted(by_bucket)), batch_size, seed)

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(bucket) / self.batch_size) for bucket in self.buckets)

    def global_batch(self, step: int) -> tuple[int, ...]:
        epoch, index = divmod(step, self.batches_per_epoch)
        return self._epoch(epoch)[index]

    @lru_cache(maxsize=2)  # noqa: B019 - a plan lives as long as its run; two epochs straddle a boundary
    def _epoch(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        import torch

        generator = seeded(self.seed, "epoch", epoch)
        batches: list[tuple[int, ...]] = []
        for bucket in self.buckets:
            order = [bucket[i] for i in torch.randperm(len(bucket), generator=generator).tolist()]
            count = math.ceil(len(order) / self.batch_size)
            filled = [order[i % len(order)] for i in range(count * self.batch_size)]
            batches.extend(tuple(filled[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(count))
        return tuple(batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())
