"""Run resolved requests through a ModelStack: one library call per task (and per call shape) per batch,
with the safety policy applied before anything leaves.

`BatchRunner` calls it for a job's Serve replicas and for the CLI alike, so a row behaves the same in a job and on
the command line. Order of checks: a generation prompt is filtered before the generator sees it; a generated
image is scored before its bytes are attached to the result (a blocked image is dropped here, a quarantined one
travels only as `quarantine_png`); an input image is scored before it is captioned. An edit row gets both: each
of its references is scored as an input (a flagged one blocks the row, whatever the policy says about captioning
flagged inputs, and never reaches the generator), then its instruction and its output as a generation row's.
When the stack carries a CLIP model (a job's `quality.clip_score`), every ok generated or edited image is scored
against its prompt last, in the same call (`clip_score`, its time in `quality_ms`).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence

import structlog
from PIL import Image

from factory.model.generator import EditParams, GenerationParams
from factory.model.stack import ModelStack
from factory.routing.requests import ImageCheck, Status, Task, TaskRequest, TaskResult

log = structlog.get_logger(__name__)


def encode_png(image: Image.Image) -> bytes:
    # Pillow writes no timestamps into PNGs, so the same pixels always give the same bytes.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def base_result(request: TaskRequest, stack: ModelStack | None, **fields) -> TaskResult:
    """A result carrying the request's fields; `stack` is None for a row no model saw (its input was unreadable,
    or every replica call failed), which then names no profile or model version."""
    return TaskResult(
        id=request.id, tenant=request.tenant, region=request.region, task=request.task, prompt=request.prompt,
        question=request.question, source_uri=request.image, adapter=request.adapter,
        reference_uris=list(request.images) if request.images else None,
        references=list(request.references) if request.references else None,
        answers=list(request.answers) if request.answers else None,
        profile=stack.profile.name if stack is not None else None,
        model_version=stack.model_version if stack is not None else None, seed=request.seed,
        performance=stack.generator.performance_tag if stack is not None and request.task in IMAGE_TASKS else None,
        steps=request.steps, width=request.width, height=request.height, guidance=request.guidance,
        **fields,
    )


def safety_fields(verdict) -> dict:
    """The result columns that record a safety decision (empty when no checker ran)."""
    if verdict is None:
        return {}
    return {
        "safety_verdict": verdict.verdict, "safety_decided_by": verdict.decided_by,
        "safety_labels": list(verdict.labels), "safety_scores": list(verdict.scores),
        "safety_reason": verdict.reason,
    }


# Tasks whose result is an image the generator made.
IMAGE_TASKS = (Task.GENERATE, Task.EDIT)


class _TimedSafety:
    """A SafetyChecker that adds up the time spent in it, so results can say what safety costs a row."""

    def __init__(self, checker):
        self.checker = checker
        self.seconds = 0.0

    def _timed(self, method, *args):
        started = time.perf_counter()
        try:
            return method(*args)
        finally:
            self.seconds += time.perf_counter() - started

    def check_prompts(self, *args):
        return self._timed(self.checker.check_prompts, *args)

    def check_images(self, *args):
        return self._timed(self.checker.check_images, *args)

    def check_inputs(self, *args):
        return self._timed(self.checker.check_inputs, *args)

    def should_answer(self, verdict) -> bool:
        return self.checker.should_answer(verdict)


class TaskExecutor:
    """Stateless over a stack: `run` takes a batch and returns one result per request, in order."""

    def __init__(self, stack: ModelStack, safety=None):
        self.stack = stack
        self.safety = _TimedSafety(safety) if safety is not None else None
        self.scoring_seconds = 0.0  # spent in CLIPScore, when the stack scores

    def run(self, requests: Sequence[TaskRequest],
            images: Sequence[Image.Image | tuple[Image.Image, ...] | None]) -> list[TaskResult]:
        """`images[i]` is request i's input: None (generate), its image (caption, vqa), or its references (edit)."""
        results: list[TaskResult | None] = [None] * len(requests)
        for task, call in ((Task.GENERATE, self._generate), (Task.EDIT, self._edit), (Task.CAPTION, self._caption),
                           (Task.VQA, self._answer)):
            indices = [i for i, request in enumerate(requests) if request.task is task]
            if not indices:
                continue
            batch = [requests[i] for i in indices]
            batch_images = [images[i] for i in indices]
            started = time.perf_counter()
            safety_before = self.safety.seconds if self.safety else 0.0
            scoring_before = self.scoring_seconds
            try:
                produced = call(batch, batch_images)
            except Exception as error:  # a model failure fails its rows, never the whole batch's other tasks
                log.warning("model call failed", task=task.value, rows=len(batch), error=repr(error))
                produced = [
                    base_result(r, self.stack, status=Status.FAILED, error=f"{type(error).__name__}: {error}")
                    for r in batch
                ]
            per_row_ms = (time.perf_counter() - started) * 1000 / len(batch)
            safety_ms = ((self.safety.seconds if self.safety else 0.0) - safety_before) * 1000 / len(batch)
            scored = self.stack.clip is not None and task in IMAGE_TASKS
            quality_ms = (self.scoring_seconds - scoring_before) * 1000 / len(batch)
            for index, result in zip(indices, produced, strict=True):
                result.latency_ms = round(per_row_ms, 3)
                result.safety_ms = round(safety_ms, 3) if self.safety else None
                result.quality_ms = round(quality_ms, 3) if scored else None
                results[index] = result
        return results  # type: ignore[return-value]

    def _generate(self, batch: list[TaskRequest], _images) -> list[TaskResult]:
        return self._make_images(batch, lambda indices: self.stack.generate([
            GenerationParams(r.prompt or "", r.seed or 0, r.steps or 1, r.width or 16, r.height or 16,
                             r.guidance or 0.0)
            for r in (batch[i] for i in indices)
        ]))

    def _edit(self, batch: list[TaskRequest], references: list[tuple[Image.Image, ...]]) -> list[TaskResult]:
        """References first, in one detector call for the batch: a row with a flagged reference is blocked here.
        The others run as generation rows do, through `stack.edit`."""
        results: list[TaskResult | None] = [None] * len(batch)
        flat = [image for row in references for image in row]
        verdicts = self.safety.check_inputs(flat) if self.safety else [None] * len(flat)
        allowed, start = [], 0
        for index, (request, row) in enumerate(zip(batch, references, strict=True)):
            row_verdicts, start = verdicts[start:start + len(row)], start + len(row)
            flagged = [(position, v) for position, v in enumerate(row_verdicts) if v is not None and v.flagged]
            if not flagged:
                allowed.append(index)
                continue
            position, verdict = flagged[0]
            verdict = verdict.model_copy(update={"reason": f"reference {position}: {verdict.reason}"})
            results[index] = base_result(
                request, self.stack, status=Status.BLOCKED, **safety_fields(verdict),
                # As for a caption's input: under a quarantine policy the flagged reference is kept for review.
                quarantine_png=encode_png(row[position]) if verdict.verdict == "quarantined" else None,
            )
        rows = [(batch[i], references[i]) for i in allowed]

        def edit(indices: list[int]) -> list[Image.Image]:
            return self.stack.edit([
                EditParams(r.prompt or "", refs, r.seed or 0, r.steps or 1, r.guidance or 0.0, r.width, r.height)
                for r, refs in (rows[i] for i in indices)
            ])

        made = self._make_images([request for request, _ in rows], edit) if rows else []
        for index, result in zip(allowed, made, strict=True):
            results[index] = result
        return results  # type: ignore[return-value]

    def _make_images(self, batch: list[TaskRequest],
                     make: Callable[[list[int]], list[Image.Image]]) -> list[TaskResult]:
        """Rows whose result is a made image: the prompt filter, then `make(indices of the allowed rows)`, the image
        check, and the rows' checks."""
        results: list[TaskResult | None] = [None] * len(batch)
        prompt_verdicts = (
            self.safety.check_prompts([r.prompt for r in batch], [r.tenant for r in batch], [r.region for r in batch])
            if self.safety else [None] * len(batch)
        )
        allowed = []
        for index, (request, verdict) in enumerate(zip(batch, prompt_verdicts, strict=True)):
            if verdict is not None and verdict.flagged:
                results[index] = base_result(request, self.stack, status=Status.BLOCKED, **safety_fields(verdict))
            else:
                allowed.append(index)
        if allowed:
            images = make(allowed)
            image_verdicts = self.safety.check_images(images) if self.safety else [None] * len(images)
            for index, image, verdict in zip(allowed, images, image_verdicts, strict=True):
                results[index] = self._generated_result(batch[index], image, verdict)
            made = dict(zip(allowed, images, strict=True))
            self._run_checks(batch, results, made)
            self._score(batch, results, made)
        return results  # type: ignore[return-value]

    def _score(self, batch: list[TaskRequest], results: list, images: dict[int, Image.Image]) -> None:
        """CLIPScore of each ok image against its prompt, one CLIP call for the batch, when the stack scores. A
        blocked image is scored by no model; a failure fails the rows, as any model's does (an unscored row would
        drop out of its group's mean unseen)."""
        ok = [index for index in images if results[index].status is Status.OK]
        if self.stack.clip is None or not ok:
            return
        started = time.perf_counter()
        try:
            scores = self.stack.clip_score([images[i] for i in ok], [batch[i].prompt or "" for i in ok])
        finally:
            self.scoring_seconds += time.perf_counter() - started
        for index, score in zip(ok, scores, strict=True):
            results[index].clip_score = score

    def _run_checks(self, batch: list[TaskRequest], results: list, images: dict[int, Image.Image]) -> None:
        """Ask each ok image its row's checks: one VLM call per distinct check across the batch. Blocked images
        are never shown to another model."""
        asked: dict[ImageCheck, list[int]] = {}
        for index, request in enumerate(batch):
            if results[index].status is Status.OK:
                for check in request.checks:
                    asked.setdefault(check, []).append(index)
        for check, indices in asked.items():
            pictures = [images[i] for i in indices]
            if check.question is None:
                answers = self.stack.caption(pictures)
            else:
                answers = self.stack.answer(pictures, [check.question] * len(pictures))
            for index, answer in zip(indices, answers, strict=True):
                results[index].checks = {**(results[index].checks or {}), check.name: answer}

    def _generated_result(self, request: TaskRequest, image: Image.Image, verdict) -> TaskResult:
        fields = safety_fields(verdict)
        if verdict is None or not verdict.flagged:
            result = base_result(request, self.stack, status=Status.OK, image_png=encode_png(image), **fields)
        elif verdict.verdict == "quarantined":
            result = base_result(request, self.stack, status=Status.BLOCKED, quarantine_png=encode_png(image), **fields)
        else:
            result = base_result(request, self.stack, status=Status.BLOCKED, **fields)
        # An edit without a size takes its first reference's aspect ratio: record the size it was made at.
        result.width, result.height = image.size
        return result

    def _screen_inputs(self, batch: list[TaskRequest], images: list[Image.Image]):
        """Input verdicts, and which rows may still be answered under the policy."""
        if self.safety is None:
            return [None] * len(batch), list(range(len(batch)))
        verdicts = self.safety.check_inputs(images)
        return verdicts, [i for i, v in enumerate(verdicts) if self.safety.should_answer(v)]

    def _vlm_task(self, batch, images, run, field: str) -> list[TaskResult]:
        verdicts, answerable = self._screen_inputs(batch, images)
        results = [
            base_result(
                request, self.stack, status=Status.BLOCKED, **safety_fields(verdict),
                # Under a quarantine policy a flagged input is kept aside for review, like a generated image.
                quarantine_png=encode_png(image) if verdict is not None and verdict.verdict == "quarantined" else None,
            )
            for request, verdict, image in zip(batch, verdicts, images, strict=True)
        ]
        if answerable:
            texts = run([batch[i] for i in answerable], [images[i] for i in answerable])
            for index, text in zip(answerable, texts, strict=True):
                results[index] = base_result(
                    batch[index], self.stack, status=Status.OK, **{field: text}, **safety_fields(verdicts[index])
                )
        return results

    def _caption(self, batch: list[TaskRequest], images: list[Image.Image]) -> list[TaskResult]:
        return self._vlm_task(batch, images, lambda rows, imgs: self.stack.caption(imgs, [r.prompt for r in rows]),
                              "caption")

    def _answer(self, batch: list[TaskRequest], images: list[Image.Image]) -> list[TaskResult]:
        return self._vlm_task(batch, images,
                              lambda rows, imgs: self.stack.answer(imgs, [r.question or "" for r in rows]), "answer")
