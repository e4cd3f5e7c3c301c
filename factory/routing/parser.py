"""Which task a row asks for, and the checks that the task's fields are there.

Rules, in order: an explicit `task` wins; else a prompt starting with "Question:" is VQA, one starting with
"Describe:" is a caption (both need an image) and one starting with "Edit:" is an edit (it needs `image`, one
reference, or `images`, several); anything else is text-to-image.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from factory.errors import InputError, validation_problems
from factory.routing.requests import RowInput, Task, TaskRequest
from factory.routing.tenants import TenantError, resolve_adapter

QUESTION_PREFIX = "question:"
DESCRIBE_PREFIX = "describe:"
EDIT_PREFIX = "edit:"

# Names people use for the four tasks; the canonical value is what results record.
TASK_ALIASES: dict[str, Task] = {
    "generate": Task.GENERATE, "text-to-image": Task.GENERATE, "t2i": Task.GENERATE,
    "caption": Task.CAPTION, "describe": Task.CAPTION,
    "vqa": Task.VQA, "question": Task.VQA, "ask": Task.VQA,
    "edit": Task.EDIT, "image-edit": Task.EDIT,
}


class RequestError(InputError):
    """A request that cannot run; `field` names the offending field for the rejects table and the CLI's error."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class GenerationDefaults(BaseModel):
    """Values a generation row gets when it leaves them out (job spec first, then the profile)."""

    steps: int
    width: int
    height: int
    guidance: float
    edit_guidance: float | None = Field(default=None, description="Edit rows' guidance; None: `guidance`")


def parse_row(raw: dict[str, Any]) -> RowInput:
    """Check one row's shape; the first problem (in field order) is the one a rejects table can name."""
    try:
        return RowInput.model_validate(raw)
    except ValidationError as error:
        first = validation_problems(error)[0]
        raise RequestError(first.field or "row", first.reason) from None


def default_seed(tenant: str, row_id: str) -> int:
    """A stable seed from the row's identity: re-runs reproduce images without the manifest naming seeds."""
    digest = hashlib.sha256(f"{tenant}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _seed(row: RowInput) -> int:
    return row.seed if row.seed is not None else default_seed(row.tenant, row.id)


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):].strip() if text.lower().startswith(prefix) else text


def resolve_task(row: RowInput) -> Task:
    if row.task is not None:
        try:
            return TASK_ALIASES[row.task.lower()]
        except KeyError:
            raise RequestError("task", f"unknown task {row.task!r} (use generate, caption, vqa or edit)") from None
    prompt = (row.prompt or "").lower()
    if prompt.startswith(QUESTION_PREFIX):
        return Task.VQA
    if prompt.startswith(DESCRIBE_PREFIX):
        return Task.CAPTION
    if prompt.startswith(EDIT_PREFIX):
        return Task.EDIT
    if row.question is not None:
        return Task.VQA
    return Task.GENERATE


def parse_request(raw: dict[str, Any] | RowInput, defaults: GenerationDefaults) -> TaskRequest:
    """Validate one row and resolve it into a TaskRequest, or raise RequestError naming the field."""
    row = raw if isinstance(raw, RowInput) else parse_row(raw)
    task = resolve_task(row)
    common = {"id": row.id, "tenant": row.tenant, "task": task, "region": row.region, "adapter": row.adapter}
    _check_expected(row, task)

    if task is Task.EDIT:
        return _edit_request(row, defaults, common)
    if row.images is not None:
        raise RequestError("images", f"only edit rows take several images; {task.value} takes one, as `image`"
                           if task is not Task.GENERATE else "text-to-image takes no input image")
    if task is Task.GENERATE:
        if not row.prompt:
            raise RequestError("prompt", "required for text-to-image")
        if row.image is not None:
            raise RequestError("image", "text-to-image takes no input image")
        return TaskRequest(
            **common, prompt=row.prompt, seed=_seed(row), steps=row.steps or defaults.steps,
            width=row.width or defaults.width,
            height=row.height or defaults.height,
            guidance=row.guidance if row.guidance is not None else defaults.guidance,
        )

    if not row.image:
        raise RequestError("image", f"required for {task.value}")
    if task is Task.VQA:
        question = row.question or _strip_prefix(row.prompt or "", QUESTION_PREFIX)
        question = _strip_prefix(question, QUESTION_PREFIX)
        if not question:
            raise RequestError("question", "required for vqa (a 'question' field or a 'Question: ...' prompt)")
        return TaskRequest(**common, prompt=row.prompt, question=question, image=row.image,
                           answers=tuple(row.answers) if row.answers else None)

    instruction = _strip_prefix(row.prompt or "", DESCRIBE_PREFIX) or None
    return TaskRequest(**common, prompt=instruction, image=row.image,
                       references=tuple(row.references) if row.references else None)


# What a row may be scored against, and the one task whose output each scores.
_EXPECTED = {"references": (Task.CAPTION, "reference captions"), "answers": (Task.VQA, "expected answers")}


def _check_expected(row: RowInput, task: Task) -> None:
    for field, (scored, what) in _EXPECTED.items():
        if getattr(row, field) is not None and task is not scored:
            raise RequestError(field, f"only {scored.value} rows take {what}; this row is {task.value}")


def _edit_request(row: RowInput, defaults: GenerationDefaults, common: dict[str, Any]) -> TaskRequest:
    """An edit: an instruction and its references, with everything a generation row has; no size means the first
    reference's aspect ratio (decided by the generator, which sees the reference)."""
    instruction = _strip_prefix(row.prompt or "", EDIT_PREFIX)
    if not instruction:
        raise RequestError("prompt", "required for edit (the instruction, e.g. 'Edit: put it on a beach')")
    if row.image is not None and row.images is not None:
        raise RequestError("images", "give `image` (one reference) or `images` (several), not both")
    references = tuple(row.images) if row.images is not None else (row.image,) if row.image else ()
    if not references:
        raise RequestError("image", "required for edit (one reference as `image`, several as `images`)")
    for index, uri in enumerate(references):
        if not uri:
            raise RequestError("images", f"reference {index} is empty")
    if (row.width is None) != (row.height is None):
        missing = "height" if row.height is None else "width"
        raise RequestError(missing, "give width and height together, or neither (the first reference's aspect "
                           "ratio within the profile's default size)")
    guidance = row.guidance if row.guidance is not None else (
        defaults.edit_guidance if defaults.edit_guidance is not None else defaults.guidance
    )
    return TaskRequest(
        **common, prompt=instruction, images=references, seed=_seed(row), steps=row.steps or defaults.steps,
        width=row.width, height=row.height, guidance=guidance,
    )


def with_adapter(request: TaskRequest, registry) -> TaskRequest:
    """Resolve the row's tenant, region and adapter name against the tenants registry (if any).

    Generation and edit rows carry the adapter's multiplexed id (`tenant/name`); caption and VQA rows never use an
    adapter (LoRAs style the generator only), but their tenant must still be known to the registry.
    """
    try:
        ref = resolve_adapter(registry, request.tenant, request.region, request.adapter)
    except TenantError as error:
        raise RequestError(error.field, str(error).removeprefix(f"{error.field}: ")) from None
    key = ref.key if ref is not None and request.task in (Task.GENERATE, Task.EDIT) else None
    # Most rows of most jobs keep what they had (no adapter): no copy for them, it is the hot path of validation.
    return request if key == request.adapter else request.model_copy(update={"adapter": key})
