"""A result row's own text scores, added where its source shapes the row: VQA accuracy of an answer against the
row's `answers`, BLEU counts of a caption against its `references` (no model: `factory.quality.scores`).
CLIPScore came from the replica that made the image; what needs the whole run (group sums, CIDEr-D, intervals)
is `factory.jobs.report.quality`'s, after the model stage."""

from __future__ import annotations

from typing import Any

from factory.jobs.spec import JobSpec, QualitySpec
from factory.model.clip import clip_version, pin_clip, scoring_model
from factory.model.profiles import get_profile
from factory.quality.scores import text_scores
from factory.routing.requests import Status, TaskResult


def row_scores(result: TaskResult, quality: QualitySpec | None) -> dict[str, Any]:
    """The score columns of an ok row with something to compare its output with, as the job's `quality` section
    turns them on; nothing without the section."""
    if quality is None or result.status is not Status.OK:
        return {}
    return text_scores(caption=result.caption if quality.captions else None,
                       answer=result.answer if quality.vqa else None,
                       references=result.references, answers=result.answers)


def scoring_clip_model(spec: JobSpec) -> str | None:
    """The CLIP model a job's replicas score images with, as results and reuse keys name it (`org/name@<commit>`
    once `pin_models` pinned it; the tiny builder's version); None for a job that scores no images."""
    if spec.quality is None or not spec.quality.clip_score:
        return None
    return clip_version(pin_clip(scoring_model(get_profile(spec.profile)), spec.quality.clip_revision))
