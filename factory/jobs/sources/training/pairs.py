"""Images paired with their captions, read from one chunk of a training data set, lazily (a tar shard streams).

An image and its caption share a stem: `cat.png` with `cat.txt` (kohya / ai-toolkit), `cat.caption`, or
`cat.json` holding `{"caption": ...}`; in a tar shard they are adjacent members with one key (WebDataset). A
caption run's results give each ok row's caption and image (its dataset/ copy, or the file it captioned).
Listing and reading go through `factory.io.archives` (folders, s3:// prefixes, tar shards: links, devices and
names that climb out refused there).

Every input that cannot become a training sample is a `Refused` with its reason: an image without a caption, a
caption without its image, an empty or unreadable caption, a member that could not be read, a caption run's row
that was not ok. Decoding the image (and refusing a corrupt one) is the reader's (`factory.jobs.sources.training
.reader`).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby

import pyarrow.parquet as pq

from factory.errors import InputError
from factory.io.archives import Entry, read_folder_entries, read_prefix_entries, read_tar_entries
from factory.io.storage import Storage
from factory.jobs.sources.training.listing import TrainingChunk, stem
from factory.jobs.training.data import NO_CAPTION

CAPTION_SUFFIXES = (".txt", ".caption", ".json")  # in this order of preference when a stem has several
MAX_CAPTION_BYTES = 64 * 1024
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Pair:
    """An image's bytes and its caption."""

    name: str  # the member's name in its chunk (a row id in a results file)
    source_uri: str  # where the image was read: a file, an object, or `shard:member`
    data: bytes
    caption: str


@dataclass(frozen=True)
class Refused:
    """An input that cannot become a sample, and why."""

    name: str
    field: str  # "image", "caption" or "status"
    reason: str


def read_pairs(storage: Storage, chunk: TrainingChunk, max_bytes: int) -> Iterator[Pair | Refused]:
    """The chunk's pairs and refusals, in its order."""
    if chunk.kind == "results":
        yield from _results_pairs(storage, chunk, max_bytes)
        return
    for _, group in groupby(_entries(storage, chunk, max_bytes), key=lambda entry: stem(entry.name)):
        yield from _paired(chunk, list(group))


def _entries(storage: Storage, chunk: TrainingChunk, max_bytes: int) -> Iterator[Entry]:
    if chunk.kind == "folder":
        return read_folder_entries(chunk.uri, list(chunk.names), max_bytes, companions=True)
    if chunk.kind == "prefix":
        return read_prefix_entries(storage, chunk.uri, list(chunk.names), max_bytes, companions=True)
    return read_tar_entries(storage, chunk.uri, max_bytes, companions=True)


def _results_pairs(storage: Storage, chunk: TrainingChunk, max_bytes: int) -> Iterator[Pair | Refused]:
    with storage.open_read(chunk.uri) as stream:
        table = pq.read_table(stream, columns=["id", "status", "caption", "image_uri", "source_uri", "error"])
    for row in table.to_pylist():
        name = row["id"] or ""
        if row["status"] != "ok":
            yield Refused(name, "status", f"{row['status']} in the caption run"
                          + (f" ({row['error']})" if row["error"] else ""))
            continue
        caption = _clean(row["caption"] or "")
        if not caption:
            yield Refused(name, "caption", "empty caption")
            continue
        uri = row["image_uri"] or row["source_uri"]
        if not row["image_uri"] and not storage.exists(uri):
            yield Refused(name, "image", f"{uri}: not a file of its own (an archive member?); caption the archive "
                          "with --sidecars to train from its copies")
            continue
        try:
            yield Pair(name, uri, storage.read_bytes(uri, max_bytes=max_bytes), caption)
        except InputError as error:
            yield Refused(name, "image", str(error))


def _paired(chunk: TrainingChunk, entries: list[Entry]) -> Iterator[Pair | Refused]:
    """One stem's members: its images with the caption of the most preferred kind, or refusals saying why not."""
    captions = sorted((e for e in entries if _is_caption(e.name)),
                      key=lambda e: CAPTION_SUFFIXES.index(posixpath.splitext(e.name)[1].lower()))
    images = [e for e in entries if not e.companion and not _is_caption(e.name)]
    for entry in [e for e in images + captions if e.problem is not None]:
        yield Refused(entry.name or chunk.uri, "caption" if _is_caption(entry.name) else "image", entry.problem or "")
    images = [e for e in images if e.problem is None]
    usable = [e for e in captions if e.problem is None]
    if not images:
        for entry in usable:
            yield Refused(entry.name, "caption", "caption without its image (no image with this stem beside it)")
        return
    if not usable:
        why = f"its caption {captions[0].name} was refused" if captions else \
            f"{NO_CAPTION} ({stem(images[0].name)}.txt, .caption or .json)"
        for entry in images:
            yield Refused(entry.name, "caption", why)
        return
    caption, problem = _caption_text(usable[0])
    for image in images:
        if problem is not None:
            yield Refused(image.name, "caption", f"{usable[0].name}: {problem}")
        else:
            where = f"{chunk.uri}:{image.name}" if chunk.kind == "tar" else image.uri
            yield Pair(image.name, where, image.data or b"", caption)


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
