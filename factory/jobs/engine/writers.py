"""Writers of what a row makes besides its result row, one per kind of output, each written before the row that
points at it is committed (a redone row overwrites its own file, at the same name):

- `ImageWriter`: a generated image under `images/<tenant>/<id>.png`, or a flagged one under `quarantine/`;
- `SidecarWriter`: a trainer's copy of a captioned image and its caption, `dataset/<stem>.<ext>` + `.txt` (the
  layout kohya sd-scripts and ai-toolkit read).

Result rows themselves are written by the chunk's committer (`factory.jobs.engine.commit`), and images reused
across runs are recorded by `factory.jobs.sources.manifests.reuse`.
"""

from __future__ import annotations

import asyncio
import posixpath
import re

from factory.errors import FactoryError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.routing.requests import Status, TaskResult

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ImageWriter:
    def __init__(self, storage: Storage, layout: OutputLayout):
        self.storage, self.layout = storage, layout

    async def write(self, tenant: str, row_id: str, result: TaskResult) -> TaskResult:
        """Write an ok row's image (or a quarantined one) and name it in the result; a write that fails makes the
        row `failed` (a re-run retries it)."""
        try:
            if result.status is Status.OK and result.image_png is not None:
                uri = self.layout.image(tenant, row_id)
                await asyncio.to_thread(self.storage.write_bytes, uri, result.image_png)
                result.image_uri = uri
            elif result.quarantine_png is not None:
                uri = self.layout.quarantine(tenant, row_id)
                await asyncio.to_thread(self.storage.write_bytes, uri, result.quarantine_png)
                result.quarantine_uri = uri
        except FactoryError as error:
            result = result.model_copy(update={"status": Status.FAILED, "error": f"writing image: {error}",
                                               "image_uri": None, "quarantine_uri": None})
        return result


def dataset_stem(row_id: str, sha256: str) -> str:
    """A safe, unique file stem for a dataset copy: the object's name (letters, digits, '.', '_', '-') and its
    digest, so two sources' `cat.jpg` never collide and the name says where it came from."""
    stem = _UNSAFE.sub("_", posixpath.splitext(posixpath.basename(row_id))[0]).strip("._-")[:80] or "image"
    return f"{stem}-{sha256[:12]}"


class SidecarWriter:
    def __init__(self, storage: Storage, layout: OutputLayout):
        self.storage, self.layout = storage, layout

    def write(self, row_id: str, sha256: str, image: bytes, ext: str, caption: str) -> str:
        """dataset/<stem>.<ext> (the image) and dataset/<stem>.txt (its caption), image first; the image's URI."""
        stem = dataset_stem(row_id, sha256)
        image_uri = self.layout.dataset(f"{stem}.{ext}")
        self.storage.write_bytes(image_uri, image)
        self.storage.write_bytes(self.layout.dataset(f"{stem}.txt"), caption.encode())
        return image_uri
