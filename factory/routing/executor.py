"""Run resolved requests through a ModelStack: one library call per task (and per call shape) per batch.

The Serve replica and the local CLI both go through here, so a row behaves the same in a job, over HTTP and
on the command line.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence

import structlog
from PIL import Image

from factory.model.generator import GenerationParams
from factory.model.stack import ModelStack
from factory.routing.requests import Status, Task, TaskRequest, TaskResult

log = structlog.get_logger(__name__)

def encode_png(image: Image.Image) -> bytes:
    # Pillow writes no timestamps into PNGs, so the same pixels always give the same bytes.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

def base_result(request: TaskRequest, stack: ModelStack, **fields) -> TaskResult:
    return TaskResult(
        id=request.id, tenant=request.tenant, task=request.task, prompt=request.prompt,
        question=request.question, source_uri=request.image, adapter=request.adapter,
        profile=stack.profile.name, model_version=stack.model_version, seed=request.seed,
        steps=request.steps, width=request.width, height=request.height, guidance=request.guidance,
        **fields,
    )

class TaskExecutor:
    """Stateless over a stack: `run` takes a batch and returns one result per request, in order."""

    def __init__(self, stack: ModelStack):
        self.stack = stack

    def run(self, requests: Sequence[TaskRequest], images: Sequence[Image.Image | None]) -> list[TaskResult]:
        results: list[TaskResult | None] = [None] * len(requests)
        for task, call in ((Task.GENERATE, self._generate), (Task.CAPTION, self._caption), (Task.VQA, self._answer)):
            indices = [i for i, request in enumerate(requests) if request.task is task]
            if not indices:
                continue
            batch = [requests[i] for i in indices]
            batch_images = [images[i] for i in indices]
            started = time.perf_counter()
            try:
                produced = call(batch, batch_images)
            except Exception as error:  # a model failure fails its rows, never the whole batch's other tasks
                log.warning("model call failed", task=task.value, rows=len(batch), error=repr(error))
                produced = [
                    base_result(r, self.stack, status=Status.FAILED, error=f"{type(error).__name__}: {error}")
                    for r in batch
                ]
            per_row_ms = (time.perf_counter() - started) * 1000 / len(batch)
            for index, result in zip(indices, produced, strict=True):
                result.latency_ms = round(per_row_ms, 3)
                results[index] = result
        return results  # type: ignore[return-value]

    def _generate(self, batch: list[TaskRequest], _images) -> list[TaskResult]:
        params = [
            GenerationParams(r.prompt or "", r.seed or 0, r.steps or 1, r.width or 16, r.height or 16, r.guidance or 0.0)
            for r in batch
        ]
        images = self.stack.generate(params)
        return [
            base_result(r, self.stack, status=Status.OK, image_png=encode_png(image))
            for r, image in zip(batch, images, strict=True)
        ]

    def _caption(self, batch: list[TaskRequest], images: list[Image.Image]) -> list[TaskResult]:
        captions = self.stack.caption(images, [r.prompt for r in batch])
        return [base_result(r, self.stack, status=Status.OK, caption=c) for r, c in zip(batch, captions, strict=True)]

    def _answer(self, batch: list[TaskRequest], images: list[Image.Image]) -> list[TaskResult]:
        answers = self.stack.answer(images, [r.question or "" for r in batch])
        return [base_result(r, self.stack, status=Status.OK, answer=a) for r, a in zip(batch, answers, strict=True)]
