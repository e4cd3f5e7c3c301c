"""Captioned images from a training spec's sources: planned into units on the driver, read and paired in Ray
Data tasks, each image decoded and brought to its resolution bucket.

An image and its caption share a stem: `cat.png` with `cat.txt` (kohya / ai-toolkit), `cat.caption`, or
`cat.json` holding `{"caption": ...}`; in a tar shard they are adjacent members with one key (WebDataset). A
caption run's results give each ok row's caption and image (its dataset/ copy, or the file it captioned).
Listing and reading go through `factory.io.archives` (folders, s3:// prefixes, tar shards: links, devices and
names that climb out refused there) and decoding through `factory.io.images.prepare_image`.

Every input that cannot become a training sample is a reject with its reason: an image without a caption, a
caption without its image, an empty or unreadable caption, a corrupt or oversized image, a caption run's row
that was not ok. Rejects are committed by the task that found them, like every factory worker's.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator
from itertools import groupby
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError, InputError
from factory.io.archives import (
    Entry, list_folder, list_prefix, read_folder_entries, read_prefix_entries, read_tar_entries, resolve_sources,
)
from factory.io.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, prepare_image
from factory.io.storage import Storage
from factory.model.training.buckets import fit_to_bucket, nearest_bucket
from factory.model.training.options import Bucket

CAPTION_SUFFIXES = (".txt", ".caption", ".json")  # in this order of preference when a stem has several
MAX_CAPTION_BYTES = 64 * 1024
_WHITESPACE = re.compile(r"\s+")


class TrainingUnit(BaseModel):
    """What one Ray Data read task does: some stems of a folder or prefix, one tar shard, or one results file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="'<source index>-<sequence>': names the unit's rejects part")
    kind: Literal["folder", "prefix", "tar", "results"] = Field(description="How the unit is read")
    source_index: int = Field(ge=0, description="Which spec source it came from (sample ids start with it)")
    uri: str = Field(description="The folder, prefix, shard or results Parquet file")
    names: list[str] = Field(default_factory=list, description="Folder/prefix members, grouped by stem")


def is_results_source(uri: str) -> bool:
    """A caption run's results: a .parquet file, or a folder named results/."""
    stripped = uri.rstrip("/")
    return stripped.endswith(".parquet") or posixpath.basename(stripped) == "results"


def stem(name: str) -> str:
    return posixpath.splitext(name)[0]


def plan_units(sources: list[str], storage: Storage, chunk_images: int) -> list[TrainingUnit]:
    """Units for every source, in the spec's order. Folders and prefixes are listed here (names only) and cut
    between stems, so an image and its caption are always read by one task."""
    units: list[TrainingUnit] = []
    for index, uri in enumerate(sources):
        if is_results_source(uri):
            files = [uri] if uri.endswith(".parquet") else list(storage.list_files(uri, suffixes=[".parquet"]))
            if not files:
                raise ConfigError(f"sources[{index}] {uri}: no .parquet results files there")
            units.extend(TrainingUnit(id=f"{index:03d}-{seq:05d}", kind="results", source_index=index, uri=file)
                         for seq, file in enumerate(files))
            continue
        for source in resolve_sources([uri], storage):
            if source.kind == "tar":
                units.append(TrainingUnit(id=f"{index:03d}-{len(units):05d}", kind="tar", source_index=index,
                                          uri=source.uri))
            elif source.kind in ("folder", "prefix"):
                try:
                    names = list(list_folder(source.uri) if source.kind == "folder"
                                 else list_prefix(storage, source.uri))
                except InputError as error:
                    raise ConfigError(f"sources[{index}]: {error}") from None
                units.extend(_stem_units(index, source.kind, source.uri, names, chunk_images, len(units)))
            else:
                raise ConfigError(f"sources[{index}] {source.uri}: a {source.kind} is not a training source (use "
                                  "a folder, an s3:// prefix, tar shards or a caption run's results)")
    return units


def _stem_units(index: int, kind: Any, uri: str, names: list[str], per_unit: int, first: int
                ) -> Iterator[TrainingUnit]:
    by_stem: dict[str, list[str]] = {}
    for name in names:
        by_stem.setdefault(stem(name), []).append(name)
    groups = list(by_stem.values())
    for seq, start in enumerate(range(0, len(groups), per_unit)):
        members = [name for group in groups[start:start + per_unit] for name in group]
        yield TrainingUnit(id=f"{index:03d}-{first + seq:05d}", kind=kind, source_index=index, uri=uri,
                           names=members)


# ---- reading a unit (in a Ray Data task) -----------------------------------------------------------------


class UnitReader:
    """Reads units into samples (an image brought to its bucket, with its caption) and rejects (with reasons)."""

    def __init__(self, storage: Storage, buckets: list[Bucket], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.storage, self.buckets = storage, buckets
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def read(self, unit: TrainingUnit) -> tuple[list[dict], list[dict]]:
        samples: list[dict] = []
        rejects: list[dict] = []
        if unit.kind == "results":
            pairs = self._results_pairs(unit, rejects)
        else:
            pairs = self._archive_pairs(unit, rejects)
        for name, source_uri, data, caption in pairs:
            try:
                samples.append(self._sample(unit, name, source_uri, data, caption))
            except InputError as error:
                rejects.append(_reject(unit, name, "image", str(error)))
        return samples, rejects

    def _entries(self, unit: TrainingUnit) -> Iterator[Entry]:
        if unit.kind == "folder":
            return read_folder_entries(unit.uri, unit.names, self.max_bytes, companions=True)
        if unit.kind == "prefix":
            return read_prefix_entries(self.storage, unit.uri, unit.names, self.max_bytes, companions=True)
        return read_tar_entries(self.storage, unit.uri, self.max_bytes, companions=True)

    def _archive_pairs(self, unit: TrainingUnit, rejects: list[dict]) -> Iterator[tuple[str, str, bytes, str]]:
        """(name, uri, image bytes, caption) for each image with a usable caption; rejects for the rest."""
        for _, group in groupby(self._entries(unit), key=lambda entry: stem(entry.name)):
            yield from _paired(unit, list(group), rejects)

    def _results_pairs(self, unit: TrainingUnit, rejects: list[dict]) -> Iterator[tuple[str, str, bytes, str]]:
        with self.storage.open_read(unit.uri) as stream:
            table = pq.read_table(stream, columns=["id", "status", "caption", "image_uri", "source_uri", "error"])
        for row in table.to_pylist():
            name = row["id"] or ""
            if row["status"] != "ok":
                rejects.append(_reject(unit, name, "status", f"{row['status']} in the caption run"
                                       + (f" ({row['error']})" if row["error"] else "")))
                continue
            caption = _clean(row["caption"] or "")
            if not caption:
                rejects.append(_reject(unit, name, "caption", "empty caption"))
                continue
            uri = row["image_uri"] or row["source_uri"]
            if not row["image_uri"] and not self.storage.exists(uri):
                rejects.append(_reject(unit, name, "image", f"{uri}: not a file of its own (an archive member?); "
                                       "caption the archive with --sidecars to train from its copies"))
                continue
            try:
                data = self.storage.read_bytes(uri, max_bytes=self.max_bytes)
            except InputError as error:
                rejects.append(_reject(unit, name, "image", str(error)))
                continue
            yield name, uri, data, caption

    def _sample(self, unit: TrainingUnit, name: str, source_uri: str, data: bytes, caption: str) -> dict:
        prepared = prepare_image(data, source_uri, max_pixels=self.max_pixels)
        bucket = nearest_bucket(prepared.image.width, prepared.image.height, self.buckets)
        image = fit_to_bucket(prepared.image, bucket)
        return {"id": f"{unit.source_index}:{name}", "source_uri": source_uri, "caption": caption,
                "image_sha256": hashlib.sha256(data).hexdigest(), "bucket_width": bucket.width,
                "bucket_height": bucket.height, "pixels": image.tobytes()}


def _paired(unit: TrainingUnit, entries: list[Entry], rejects: list[dict]) -> Iterator[tuple[str, str, bytes, str]]:
    """One stem's members: its images with the caption of the most preferred kind, or rejects saying why not."""
    captions = sorted((e for e in entries if _is_caption(e.name)),
                      key=lambda e: CAPTION_SUFFIXES.index(posixpath.splitext(e.name)[1].lower()))
    images = [e for e in entries if not e.companion and not _is_caption(e.name)]
    for entry in [e for e in images + captions if e.problem is not None]:
        field = "caption" if _is_caption(entry.name) else "image"
        rejects.append(_reject(unit, entry.name or unit.uri, field, entry.problem or ""))
    images = [e for e in images if e.problem is None]
    usable = [e for e in captions if e.problem is None]
    if not images:
        rejects.extend(_reject(unit, e.name, "caption", "caption without its image (no image with this stem "
                               "beside it)") for e in usable)
        return
    if not usable:
        why = f"its caption {captions[0].name} was refused" if captions else \
            f"no caption beside it ({stem(images[0].name)}.txt, .caption or .json)"
        rejects.extend(_reject(unit, e.name, "caption", why) for e in images)
        return
    caption, problem = _caption_text(usable[0])
    for image in images:
        if problem is not None:
            rejects.append(_reject(unit, image.name, "caption", f"{usable[0].name}: {problem}"))
        else:
            where = f"{unit.uri}:{image.name}" if unit.kind == "tar" else image.uri
            yield image.name, where, image.data or b"", caption


def _is_caption(name: str) -> bool:
    return name.lower().endswith(CAPTION_SUFFIXES)


def _clean(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _caption_text(entry: Entry) -> tuple[str, str | None]:
    """(caption, None) or ("", why it cannot be used)."""
    data = entry.data or b""
    if len(data) > MAX_CAPTION_BYTES:
        return "", f"caption larger than {MAX_CAPTION_BYTES} bytes"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "", "caption is not UTF-8 text"
    if entry.name.lower().endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            return "", "not valid JSON"
        found = document.get("caption", document.get("text")) if isinstance(document, dict) else None
        if not isinstance(found, str):
            return "", 'no "caption" (or "text") string in it'
        text = found
    caption = _clean(text)
    return (caption, None) if caption else ("", "empty caption")


def _reject(unit: TrainingUnit, name: str, field: str, reason: str) -> dict:
    return {"manifest": unit.uri, "manifest_line": None, "id": f"{unit.source_index}:{name}", "field": field,
            "reason": reason}
