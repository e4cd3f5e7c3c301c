"""Where a run's objects live under its output root (a local folder or s3:// prefix).

    images/<tenant>/<id>.png                      generated images of ok rows, written before their result row
    quarantine/<tenant>/<id>.png                  flagged images under a quarantine policy
    results/tenant=<t>/part-<chunk>-<writer>-<n>.parquet   result rows, committed by the chunk's worker
    rejects/tenant=<t>/part-<chunk>-<kind>.parquet   rows that failed validation, or duplicates (kind: rows,
                                                  duplicates), Hive-partitioned by tenant like results
    rejects/tenant=_unknown/part-<chunk>-rows.parquet  rows with no tenant, a tenant that is not a name or not in
                                                  the registry, or no row at all (broken JSON, unreadable bytes)
    rejects/tenant=_unknown/part-plan.parquet     manifests that could not be read at all
    _chunks/plan.json                             the chunks of the run's inputs (reused by a re-run)
    _chunks/dedup.json                            which chunks hold duplicate ids (written once dedup is complete)
    _chunks/<chunk>/...                           staged requests, duplicates, and the chunk's markers
    summary.json, _SUCCESS                        written when the run finishes (validation.json for `validate`)
    quality.json                                  runs with `quality:`: scores in all and per group, with intervals
    _inputs/<format>-<digest>.jsonl               public benchmark files (COCO, VQAv2, TextCaps) as manifest rows
    dataset/<name>.<ext>, dataset/<name>.txt      archive runs with sidecars: a passed image and its caption
    _chunks/plan/                                 archive runs: the chunks planned as the sources were listed
    _dedup/<sha[:2]>/<sha256>                     archive runs: which row captions each distinct image

Every key is a function of (run root, tenant, row id) or (run root, chunk), so a redone row overwrites its own
image and a resumed run finds what an earlier one committed. A tenant's rows, images and rejects are under its
own `tenant=<t>` (or `<t>`) folders, so each can be handed to that tenant alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from factory.io.storage import join

# The rejects partition of rows that belong to no known tenant, and of whole manifests: '_' cannot begin a tenant
# name, so it is never a tenant's own folder.
UNATTRIBUTED = "_unknown"


def object_name(row_id: str) -> str:
    """A row id as one safe path segment: ids like 'sku/12' or '..' must not become paths."""
    name = quote(row_id, safe="-_.")
    return name.replace(".", "%2E") if set(name) == {"."} else name


@dataclass(frozen=True)
class OutputLayout:
    root: str

    def image(self, tenant: str, row_id: str) -> str:
        return join(self.root, "images", tenant, f"{object_name(row_id)}.png")

    def quarantine(self, tenant: str, row_id: str) -> str:
        return join(self.root, "quarantine", tenant, f"{object_name(row_id)}.png")

    @property
    def results(self) -> str:
        return join(self.root, "results")

    @property
    def rejects(self) -> str:
        return join(self.root, "rejects")

    def result_prefix(self, tenant: str, chunk: str) -> str:
        """Every result part of one chunk for one tenant starts with this."""
        return join(self.results, f"tenant={tenant}", f"part-{chunk}-")

    def result_part(self, tenant: str, chunk: str, writer: str, sequence: int) -> str:
        return f"{self.result_prefix(tenant, chunk)}{writer}-{sequence:04d}.parquet"

    def reject_part(self, tenant: str, name: str, kind: str | None = None) -> str:
        """A part of `tenant`'s rejects (`UNATTRIBUTED` for rows and manifests that belong to no known tenant)."""
        return join(self.rejects, f"tenant={tenant}", f"part-{name}-{kind}.parquet" if kind else f"part-{name}.parquet")

    @property
    def chunks(self) -> str:
        return join(self.root, "_chunks")

    def chunk_file(self, chunk: str, name: str) -> str:
        return join(self.chunks, chunk, name)

    @property
    def plan(self) -> str:
        return join(self.chunks, "plan.json")

    @property
    def dedup_index(self) -> str:
        return join(self.chunks, "dedup.json")

    @property
    def validation(self) -> str:
        return join(self.root, "validation.json")

    @property
    def summary(self) -> str:
        return join(self.root, "summary.json")

    @property
    def success(self) -> str:
        return join(self.root, "_SUCCESS")

    @property
    def quality(self) -> str:
        return join(self.root, "quality.json")

    def staged_input(self, name: str) -> str:
        """A manifest the run wrote itself from inputs in another layout (a public benchmark's files)."""
        return join(self.root, "_inputs", name)

    # ---- archive runs (factory caption) ----

    def dataset(self, name: str) -> str:
        """An image copy or its caption sidecar (kohya / ai-toolkit layout): dataset/<name>.<ext> and .txt."""
        return join(self.root, "dataset", name)

    @property
    def archive_plan(self) -> str:
        """The run's archive chunks as they were planned: one file per chunk, and one per finished listing."""
        return join(self.chunks, "plan")

    def archive_plan_file(self, name: str) -> str:
        return join(self.archive_plan, name)

    def sha_claim(self, sha256: str) -> str:
        """Who captions the image with these bytes: claimed once per run with a conditional put."""
        return join(self.root, "_dedup", sha256[:2], sha256)
