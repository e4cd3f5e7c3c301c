"""Public benchmark files as manifests: a job's `benchmarks:` entries (COCO captions, VQAv2 questions with their
annotations, TextCaps) become JSON-lines manifests of the run, then are planned, validated and run like any other.

The published JSON is read by `factory.quality.benchmarks` into rows: caption rows carrying their human captions as
`references`, VQA rows their `question` and ten human `answers`, each with its image under the entry's `images`
folder (counted among the job's input roots). The manifest is written once per run under `_inputs/`, its name a
digest of the entry and of its files' versions: a re-run finds the same manifest and the plan's check that no input
changed holds; a benchmark file changed since is another manifest, and the run refuses it like any changed input.
Converting reads each file whole on the driver (these files are tens of MB at most: VQAv2's val annotations).
"""

from __future__ import annotations

import hashlib
import json

from factory.errors import InputError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.spec import BenchmarkSpec
from factory.quality.benchmarks import COCO_VAL2014, coco_caption_rows, textcaps_rows, vqa_rows


def stage_benchmarks(benchmarks: list[BenchmarkSpec], storage: Storage, layout: OutputLayout) -> list[str]:
    """The manifest of each entry, written if this run has not written it yet; in the entries' order."""
    manifests = []
    for entry in benchmarks:
        uri = layout.staged_input(f"{entry.format}-{_digest(entry, storage)}.jsonl")
        if not storage.exists(uri):
            lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in benchmark_rows(entry, storage))
            storage.put_if_absent(uri, "".join(lines).encode())  # the same bytes from the same files, if raced
        manifests.append(uri)
    return manifests


def benchmark_rows(entry: BenchmarkSpec, storage: Storage) -> list[dict]:
    """The entry's rows as manifest rows (its first `limit` only, when given)."""
    pattern = entry.file_pattern or COCO_VAL2014
    if entry.format == "coco_captions":
        rows = coco_caption_rows(_json(entry.annotations, storage), entry.images, tenant=entry.tenant,
                                 source=entry.annotations, file_pattern=pattern)
    elif entry.format == "vqav2":
        annotations = _json(entry.annotations, storage) if entry.annotations is not None else None
        rows = vqa_rows(_json(entry.questions, storage), annotations, entry.images, tenant=entry.tenant,
                        source=entry.questions, file_pattern=pattern)
    else:
        rows = textcaps_rows(_json(entry.annotations, storage), entry.images, tenant=entry.tenant,
                             source=entry.annotations, flat=entry.flat)
    return rows[:entry.limit] if entry.limit is not None else rows


def _json(uri: str | None, storage: Storage):
    assert uri is not None  # BenchmarkSpec requires the files of its format
    try:
        return json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{uri}: not a JSON document ({error})") from None


def _digest(entry: BenchmarkSpec, storage: Storage) -> str:
    files = [uri for uri in (entry.questions, entry.annotations) if uri is not None]
    versions = [(uri, *storage.stat(uri)) for uri in files]
    text = json.dumps([entry.model_dump(mode="json"), versions], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
