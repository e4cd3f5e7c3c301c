"""Aspect buckets: every training image is brought to the resolution bucket nearest its aspect ratio (kohya's and
ai-toolkit's habit), so portrait and landscape photos are cropped as little as possible and a batch holds images
of one size."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageOps

from factory.model.training.options import Bucket


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log ratio: 2:1 and 1:2 are equally far from 1:1); the first
    listed wins a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket.width / bucket.height) - aspect))


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """`image` scaled to cover the bucket and centre-cropped to it (Pillow's `ImageOps.fit`)."""
    if image.size == (bucket.width, bucket.height):
        return image
    return ImageOps.fit(image, (bucket.width, bucket.height), method=Image.Resampling.BICUBIC)
