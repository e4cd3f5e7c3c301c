"""Typed requests and results: the contract between manifests, the CLI, the replicas and the sinks.

`RowInput` is what a manifest row or a CLI command may carry (loose: strings from CSV are coerced).
`TaskRequest` is a fully resolved unit of work: the task is known, the fields that task needs are present,
and sizes are checked. `TaskResult` is what a replica returns for one request.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_SIDE = 2048
MIN_SIDE = 16
MAX_STEPS = 100
MAX_PROMPT_CHARS = 4000
MAX_REFERENCES = 10  # reference images one edit row may give (a profile may take fewer)
MAX_EXPECTED = 32  # reference captions or expected answers one row may carry (VQAv2 has 10, COCO 5-7)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


class Task(str, Enum):
    GENERATE = "generate"
    CAPTION = "caption"
    VQA = "vqa"
    EDIT = "edit"


class Status(str, Enum):
    OK = "ok"
    BLOCKED = "blocked"
    REJECTED = "rejected"
    FAILED = "failed"


def _blank_to_none(value: Any) -> Any:
    # CSV and spreadsheets give "" for a missing cell; treat it as absent, not as a value.
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


class RowInput(BaseModel):
    """One row as a user writes it. Only shape is checked here; `parser.parse_request` resolves the task."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=256, description="Unique id of the row within a job")
    tenant: str = Field(min_length=1, max_length=128, description="Who the row is for (billing, adapters)")
    task: str | None = Field(default=None, description="generate | caption | vqa | edit; inferred when absent")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    question: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    image: str | None = Field(default=None, description="Input image URI (local path, s3://, http(s)://); an edit's "
                              "one reference")
    images: list[str] | None = Field(
        default=None, min_length=1, max_length=MAX_REFERENCES, description="An edit's reference images (URIs, "
        "first one sets the aspect ratio); in CSV a JSON list such as [\"a.png\", \"b.png\"]",
    )
    references: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_EXPECTED, description="Caption rows: human reference captions "
        "the caption is scored against (BLEU, CIDEr-D); in CSV a JSON list, or one caption",
    )
    answers: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_EXPECTED, description="VQA rows: the expected answer, or several "
        "(VQAv2's ten human answers), the answer is scored against (VQA accuracy); in CSV a JSON list, or one answer",
    )
    region: str | None = Field(default=None, max_length=64)
    adapter: str | None = Field(default=None, max_length=128)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)

    @model_validator(mode="before")
    @classmethod
    def _blank_cells_are_absent(cls, data: Any) -> Any:
        # One pass over the row rather than a callback per field: this runs for every row of every manifest.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if _blank_to_none(value) is not None}
        return data

    @field_validator("images", "references", "answers", mode="before")
    @classmethod
    def _lists_from_text(cls, value: Any, info: ValidationInfo) -> Any:
        # A CSV cell is text: a JSON list there is the list it spells; any other text is one entry.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    what = "image URIs" if info.field_name == "images" else "texts"
                    raise ValueError(f"must be a JSON list of {what}") from None
            return [text]
        return value

    @field_validator("id", "tenant", mode="before")
    @classmethod
    def _ids_are_text(cls, value: Any) -> Any:
        # Integer ids are common in CSV/Parquet; keep them as their decimal text.
        if isinstance(value, bool):
            raise ValueError("must be text, not a boolean")
        if isinstance(value, int):
            return str(value)
        return value

    @field_validator("tenant", "region", "adapter")
    @classmethod
    def _names_not_paths(cls, value: str | None) -> str | None:
        # These become storage keys and registry lookups: a name, never a path.
        if value is not None and not NAME_PATTERN.fullmatch(value):
            raise ValueError("must be a name of letters, digits, '.', '_' or '-' (no '/', no '..')")
        if value is not None and set(value) == {"."}:
            raise ValueError("must be a name, not '.' or '..'")
        return value

    @field_validator("id")
    @classmethod
    def _printable_id(cls, value: str) -> str:
        if _CONTROL_CHARACTER.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int | None) -> int | None:
        if value is not None and value % 16:
            raise ValueError(f"must be a multiple of 16, got {value}")
        return value


class ImageCheck(BaseModel):
    """A question about a generated image (or, without one, a caption of it), asked in the same replica call; its
    answer goes into the result's `checks` under `name`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    question: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="None: a caption")


class TaskRequest(BaseModel):
    """A resolved unit of work for one replica call. Built only by `parser.parse_request`."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    task: Task
    prompt: str | None = None
    question: str | None = None
    image: str | None = None
    images: tuple[str, ...] | None = None  # edit rows: every reference (one or several), never `image`
    region: str | None = None
    adapter: str | None = None
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    checks: tuple[ImageCheck, ...] = ()  # generate/edit rows: asked of the image once it passed the safety check
    references: tuple[str, ...] | None = None  # caption rows: reference captions, carried to the result for scoring
    answers: tuple[str, ...] | None = None  # vqa rows: expected answers, carried to the result for scoring

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every input image URI the row reads: an edit's references, a caption's or question's image."""
        return self.images or ((self.image,) if self.image is not None else ())

    @property
    def named_inputs(self) -> tuple[tuple[str, str], ...]:
        """Each input URI with the field a problem with it names: `image` for a lone one (an edit's single
        reference too), `images[i]` among several."""
        uris = self.inputs
        return tuple(("image" if len(uris) == 1 else f"images[{i}]", uri) for i, uri in enumerate(uris))


class TaskResult(BaseModel):
    """What a replica returns for one request. `image_png` travels to the sink and never into Parquet."""

    id: str
    tenant: str
    region: str | None = None
    task: Task
    status: Status
    prompt: str | None = None
    question: str | None = None
    caption: str | None = None
    answer: str | None = None
    image_png: bytes | None = Field(default=None, repr=False)
    image_uri: str | None = None
    source_uri: str | None = None
    reference_uris: list[str] | None = Field(default=None, description="Edit rows: the reference images, in order")
    reference_sha256: list[str] | None = Field(
        default=None, description="Edit rows: sha256 of each reference's bytes as read, in order (what reuse keys on)"
    )
    adapter: str | None = None
    adapter_sha256: str | None = None
    profile: str | None = None
    model_version: str | None = None
    performance: str | None = Field(
        default=None, description="Generation and edit rows: the speed options the image was made with "
        "(Performance.tag)"
    )
    checks: dict[str, str] | None = Field(default=None, description="Answers to the request's image checks")
    reused_from: str | None = Field(
        default=None, description="An earlier run's image this row reuses (same resolved inputs), not generated"
    )
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    latency_ms: float | None = Field(default=None, description="Model time of the row's batch / rows in it")
    safety_ms: float | None = Field(default=None, description="Part of latency_ms spent on safety checks")
    error: str | None = None
    safety_verdict: str | None = Field(default=None, description="pass | blocked | quarantined")
    safety_decided_by: str | None = Field(default=None, description="prompt_filter | image_detector")
    safety_labels: list[str] | None = None
    safety_scores: list[float] | None = None
    safety_reason: str | None = None
    # A quarantined image travels only to OUTPUT/quarantine/; `image_uri` never points there.
    quarantine_png: bytes | None = Field(default=None, repr=False)
    quarantine_uri: str | None = None
    # Quality (factory/quality, README "Quality"): the row's own scores, kept with what they were scored against so
    # `factory eval` can score a results folder again. BLEU is a corpus score: a group's BLEU is that of its rows'
    # summed counts, never a mean of `bleu4`; CIDEr-D needs the whole run's references and is scored in its summary.
    references: list[str] | None = Field(default=None, description="Caption rows: the reference captions")
    answers: list[str] | None = Field(default=None, description="VQA rows: the expected answers")
    clip_score: float | None = Field(
        default=None, description="Ok generated or edited images, with quality.clip_score: CLIPScore against the "
        "prompt (100 x max(cos, 0), the profile's quality.clip model)"
    )
    vqa_accuracy: float | None = Field(default=None, description="Ok VQA rows with answers: VQA accuracy in [0, 1]")
    bleu4: float | None = Field(default=None, description="Ok caption rows with references: sentence BLEU-4, [0, 1]")
    bleu_candidate_length: int | None = Field(default=None, description="BLEU counts: caption tokens")
    bleu_reference_length: int | None = Field(
        default=None, description="BLEU counts: tokens of the reference closest in length"
    )
    bleu_guesses: list[int] | None = Field(default=None, description="BLEU counts: caption n-grams, n = 1..4")
    bleu_matches: list[int] | None = Field(
        default=None, description="BLEU counts: caption n-grams found in a reference (clipped), n = 1..4"
    )
    quality_ms: float | None = Field(
        default=None, description="Part of latency_ms spent scoring images (CLIPScore), per row of the batch"
    )
