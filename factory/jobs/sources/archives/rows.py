"""An archive object's one result row: shaped from its caption (and its answer, when the job asks a question),
with what was read (member, digest, format, rule, size), and its trainer sidecars written first.

A row's status is its worst call's (failed, then rejected, then blocked); a row that is not `ok` keeps no
caption or answer. With sidecars, an ok image is copied to `dataset/` with its caption beside it: byte for byte
when no rule changed it, else as the PNG of what the model saw, at full size, so a trainer reads what was
captioned. A copy of an image (same sha256) gets the captioned row's caption, verdict and dataset file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from factory.io.images import PreparedImage, prepare_image
from factory.jobs.engine.source import RunContext
from factory.jobs.engine.writers import SidecarWriter
from factory.jobs.spec import ArchiveSpec
from factory.routing.executor import base_result, encode_png
from factory.routing.requests import Status, Task, TaskRequest, TaskResult

_DATASET_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
_STATUS_ORDER = {Status.FAILED: 3, Status.REJECTED: 2, Status.BLOCKED: 1, Status.OK: 0}
# What a copy takes from the row of the image it copies.
_COPIED = ("caption", "answer", "question", "profile", "model_version", "safety_verdict", "safety_decided_by",
           "safety_labels", "safety_scores", "safety_reason", "image_uri")


@dataclass
class ArchiveObject:
    """One object of a chunk as read: where it is, and once decoded what the model sees of it."""

    name: str
    source_uri: str
    position: int | None  # in its source's listing (folders, prefixes), for the row's manifest_line
    prepared: PreparedImage | None = None
    rgb: bytes | None = None  # the pixels sent to the replicas (dropped once the row is made)
    data: bytes | None = None  # the original bytes, kept only for a sidecar copy
    sha256: str | None = None
    owner: tuple[str, str] | None = None  # a copy's (row id, chunk) of the row that is captioned


def caption_instruction(prompt: str | None) -> str | None:
    """`Describe: a short alt text` -> `a short alt text` (as in manifests); a plain prompt is the instruction."""
    if prompt is None:
        return None
    text = prompt.strip()
    if text.lower().startswith("describe:"):
        text = text[len("describe:"):].strip()
    return text or None


class ArchiveRows:
    """Makes the rows of one job's archive objects; shipped to Ray workers."""

    def __init__(self, run: RunContext, archive: ArchiveSpec):
        self.run, self.archive = run, archive
        self.instruction = caption_instruction(archive.prompt)
        self.sidecars = SidecarWriter(run.storage, run.layout)

    def request(self, row_id: str, obj: ArchiveObject, task: Task) -> TaskRequest:
        return TaskRequest(
            id=row_id, tenant=self.archive.tenant, task=task, image=obj.source_uri,
            prompt=self.instruction if task is Task.CAPTION else None,
            question=self.archive.question if task is Task.VQA else None,
        )

    def row(self, uri: str, row_id: str, obj: ArchiveObject, status: Status, *, error: str | None = None,
            result: TaskResult | None = None, attempts: int = 0) -> dict:
        """A row of the chunk at `uri` for `obj`, with `result`'s fields (a bare one for a row no model saw)."""
        if result is None:
            request = TaskRequest(id=row_id, tenant=self.archive.tenant, task=Task.CAPTION, image=obj.source_uri,
                                  prompt=self.instruction)
            result = base_result(request, None, status=status, error=error)
        row = result.model_dump(mode="json", exclude={"image_png", "quarantine_png"})
        prepared = obj.prepared
        row.update(
            status=status.value, error=error, source_uri=obj.source_uri, member=obj.name, sha256=obj.sha256,
            format=prepared.format if prepared else None, rule=prepared.rule if prepared else None,
            width=prepared.width if prepared else None, height=prepared.height if prepared else None,
            image_uri=None, attempts=attempts, run_id=self.run.run_id, manifest=uri,
            manifest_line=None if obj.position is None else obj.position + 1, finished_at=datetime.now(UTC),
            duplicate_of=None,
        )
        return row

    def model_row(self, uri: str, row_id: str, obj: ArchiveObject, caption: TaskResult, answer: TaskResult | None,
                  attempts: int) -> dict:
        """The row of a captioned object (its answer merged in), its sidecars written first."""
        status, error = caption.status, caption.error
        if answer is not None and _STATUS_ORDER[answer.status] > _STATUS_ORDER[status]:
            status, error = answer.status, answer.error
        row = self.row(uri, row_id, obj, status, error=error, result=caption, attempts=attempts)
        if answer is not None:
            row.update(question=answer.question, answer=answer.answer if status is Status.OK else None,
                       latency_ms=(caption.latency_ms or 0.0) + (answer.latency_ms or 0.0),
                       safety_ms=(caption.safety_ms or 0.0) + (answer.safety_ms or 0.0))
        if status is not Status.OK:
            row.update(caption=None, answer=None)
        elif self.archive.sidecars:
            row["image_uri"] = self._write_sidecars(row_id, obj, row["caption"] or "")
        return row

    def copy_row(self, uri: str, row_id: str, obj: ArchiveObject, owner: dict) -> dict:
        """A copy's row: the captioned row's caption, answer, verdict and dataset file; no model time."""
        row = self.row(uri, row_id, obj, Status(owner["status"]), error=owner["error"])
        for name in _COPIED:
            row[name] = owner[name]
        row.update(latency_ms=0.0, safety_ms=0.0, duplicate_of=owner["id"])
        return row

    def _write_sidecars(self, row_id: str, obj: ArchiveObject, caption: str) -> str:
        assert obj.prepared is not None and obj.sha256 is not None and obj.data is not None
        if obj.prepared.rule == "none":
            data, ext = obj.data, _DATASET_EXT.get(obj.prepared.format, "img")
        else:
            full = prepare_image(obj.data, obj.source_uri, max_pixels=self.archive.max_pixels)
            data, ext = encode_png(full.image), "png"
        obj.data = None
        return self.sidecars.write(row_id, obj.sha256, data, ext, caption)
