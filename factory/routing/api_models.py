"""The online API's typed shapes: request and response bodies (HTTP JSON and gRPC share them), the error body,
and the `api:` section of a serving config.

Bodies check shape only (types, ranges, unknown fields: 422 naming the field); what a request means is decided
by the same task parser and tenants registry as a manifest row (`parser.parse_request`, `parser.with_adapter`),
so a request and a row with the same fields become the same `TaskRequest`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory.io.roots import InputRoots, normalise_root
from factory.routing.auth import ApiKey
from factory.routing.requests import (
    _CONTROL_CHARACTER, MAX_PROMPT_CHARS, MAX_REFERENCES, MAX_SIDE, MAX_STEPS, MIN_SIDE, NAME_PATTERN, TaskResult,
)

_NAME = f"^{NAME_PATTERN.pattern}$"
# An adapter is a name of the caller's tenant; `tenant/name` is accepted too, and another tenant's is refused.
_ADAPTER = f"^(?:{NAME_PATTERN.pattern}/)?{NAME_PATTERN.pattern}$"
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")

Output = Literal["base64", "uri"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="Your id for the request; echoed back, names the stored image, and seeds a generation that "
        "has no seed (default: a random id)",
    )
    output: Output = Field(
        default="base64",
        description="Where a generated image goes: `base64` in the response, or `uri`: written under the "
        "server's output prefix, its URI in `image_uri`",
    )

    @field_validator("id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and _CONTROL_CHARACTER.search(value):
            raise ValueError("must not contain control characters")
        return value


class _ImageSource(BaseModel):
    image_base64: str | None = Field(
        default=None, min_length=1, description="Input image bytes, base64 (PNG, JPEG, WebP, GIF, BMP or TIFF)"
    )
    image_uri: str | None = Field(
        default=None, min_length=1, max_length=2048,
        description="Or an s3:// URI under one of the server's input prefixes",
    )

    @field_validator("image_base64")
    @classmethod
    def _base64_alphabet(cls, value: str | None) -> str | None:
        # Only the alphabet here; the decoded size is the server's limit (413), checked before decoding.
        if value is not None and not _BASE64.fullmatch(value.replace("\n", "").replace("\r", "")):
            raise ValueError("must be base64 (standard or URL-safe alphabet)")
        return value

    @model_validator(mode="after")
    def _one_image(self) -> _ImageSource:
        if self.image_base64 is not None and self.image_uri is not None:
            raise ValueError("image_base64 and image_uri: give one, not both")
        return self


class _ImageInput(_Body, _ImageSource):
    """A body with one input image."""


class ReferenceImage(_ImageSource):
    """One reference image of an edit: base64 bytes or an s3:// URI (over gRPC: `image` bytes or `image_uri`)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class _References(BaseModel):
    images: list[ReferenceImage] | None = Field(
        default=None, min_length=1, max_length=MAX_REFERENCES,
        description="Edits only: several reference images, in order (the first sets the output's aspect ratio), "
        "for profiles that take several; one reference goes in image_base64 or image_uri. Every base64 reference "
        "counts towards the server's body limit",
    )


class _Generation(BaseModel):
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Same seed, same image")
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Denoising steps (server default)")
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16, description="Multiple of 16")
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16, description="Multiple of 16")
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    region: str | None = Field(default=None, max_length=64, pattern=_NAME, description="Picks the tenant's region adapter")
    adapter: str | None = Field(
        default=None, max_length=257, pattern=_ADAPTER,
        description="An adapter name of your tenant (`base`: none); another tenant's adapter is 403",
    )


class GenerateBody(_Body, _Generation):
    """POST /v1/generate: text to image."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw")


class CaptionBody(_ImageInput):
    """POST /v1/caption: a caption of an image."""

    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="Caption instruction")


class AnswerBody(_ImageInput):
    """POST /v1/answer: an answer to a question about an image."""

    question: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class EditBody(_ImageInput, _References, _Generation):
    """POST /v1/edit: an image from reference images and an instruction (the product stays, the scene changes).
    Without width and height the output keeps the first reference's aspect ratio within the server's default
    size's pixels."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The instruction")


class TaskBody(_ImageInput, _References, _Generation):
    """POST /v1/tasks: any task, decided by the task parser: an explicit `task` wins; else a prompt starting
    with "Question:" is answered, one starting with "Describe:" is a caption and one starting with "Edit:" is an
    edit (all need an image); anything else is generated."""

    task: str | None = Field(
        default=None, max_length=32, description="generate | caption | vqa | edit (also t2i, describe, ask, ...)"
    )
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    question: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)


# The task each explicit endpoint fixes; /v1/tasks leaves it to the parser.
BODY_TASK: dict[type[_Body], str | None] = {GenerateBody: "generate", CaptionBody: "caption", AnswerBody: "vqa",
                                            EditBody: "edit", TaskBody: None}


class SafetyInfo(BaseModel):
    verdict: str | None = Field(default=None, description="pass | blocked | quarantined")
    decided_by: str | None = Field(default=None, description="prompt_filter | image_detector")
    labels: list[str] | None = None
    scores: list[float] | None = None
    reason: str | None = None


class TaskResponse(BaseModel):
    """A finished request: `ok` with its caption, answer or image, or `blocked` by the safety policy (no image)."""

    id: str
    tenant: str
    task: Literal["generate", "caption", "vqa", "edit"]
    status: Literal["ok", "blocked"]
    prompt: str | None = None
    question: str | None = None
    caption: str | None = None
    answer: str | None = None
    image_base64: str | None = Field(default=None, description="The PNG, base64 (output `base64`)")
    image_uri: str | None = Field(default=None, description="Where the PNG was written (output `uri`)")
    adapter: str | None = Field(default=None, description="tenant/name of the adapter used, if any")
    adapter_sha256: str | None = None
    reference_sha256: list[str] | None = Field(
        default=None, description="Edits: the sha256 of each reference image's bytes, in order"
    )
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    profile: str | None = None
    model_version: str | None = None
    latency_ms: float | None = Field(default=None, description="Model time of the request (its share of the batch)")
    safety: SafetyInfo | None = None


class ErrorBody(BaseModel):
    """Every error: the HTTP status, a code, one line saying what was wrong, and the field to blame if any."""

    status: int
    code: str
    message: str
    field: str | None = None


class ApiError(Exception):
    """An answer other than 200: its status, a code, one line, the field to blame, extra headers."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(status=self.status, code=self.code, message=self.message, field=self.field)


class HealthBody(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    message: str | None = None


def response_of(result: TaskResult, *, image_base64: str | None, image_uri: str | None) -> TaskResponse:
    safety = None
    if result.safety_verdict is not None:
        safety = SafetyInfo(verdict=result.safety_verdict, decided_by=result.safety_decided_by,
                            labels=result.safety_labels, scores=result.safety_scores, reason=result.safety_reason)
    return TaskResponse(
        id=result.id, tenant=result.tenant, task=result.task.value, status=result.status.value,
        prompt=result.prompt, question=result.question, caption=result.caption, answer=result.answer,
        image_base64=image_base64, image_uri=image_uri, adapter=result.adapter, adapter_sha256=result.adapter_sha256,
        reference_sha256=result.reference_sha256, seed=result.seed, steps=result.steps, width=result.width,
        height=result.height, guidance=result.guidance,
        profile=result.profile, model_version=result.model_version, latency_ms=result.latency_ms, safety=safety,
    )


# ---- the server's `api:` section -------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# Addresses that already mean "every interface": a gRPC proxy on [::] exposes nothing HTTP does not.
ALL_INTERFACES = frozenset({"0.0.0.0", "::", "[::]"})
# The most a message may hold beyond its image: prompts, question, ids and the JSON or protobuf around them.
FIELDS_SLACK_BYTES = 64 * 1024


class HttpOptions(_Section):
    host: str = Field(default="127.0.0.1", description="Serve's HTTP proxy address (loopback by default)")
    port: int = Field(default=8000, ge=1, le=65535)


class GrpcOptions(_Section):
    enabled: bool = Field(
        default=False, description="Start Serve's gRPC proxy with the factory.v1.Factory service (off by default: "
        "it listens on every interface, see all_interfaces)"
    )
    port: int = Field(default=9000, ge=1, le=65535)
    all_interfaces: bool = Field(
        default=False, description="Accept that Serve's gRPC proxy listens on every interface ([::]:port, Ray 2.60 "
        "has no host for it) while http.host is narrower; without it such a config is refused at start"
    )

    def bind_address(self) -> str:
        """Where Serve's gRPC proxy listens: `[::]:port` whatever the HTTP host (ray/serve/_private/grpc_util.py)."""
        return f"[::]:{self.port}"


class Limits(_Section):
    """Bounds on one request's work, below the manifest limits (an online request must finish in seconds)."""

    max_side: int = Field(default=MAX_SIDE, ge=MIN_SIDE, le=MAX_SIDE, description="Largest width or height")
    max_steps: int = Field(default=MAX_STEPS, ge=1, le=MAX_STEPS)
    max_image_bytes: int = Field(default=16 * 1024**2, ge=1024, description="Input image bytes (413 past it)")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Input image pixels (413 past it)")
    max_body_bytes: int | None = Field(
        default=None, ge=1024, description="An HTTP request body (413) or a gRPC message (RESOURCE_EXHAUSTED) past "
        "this is refused before it is read whole; default 1.5 x max_image_bytes + 64 KiB (base64 with line breaks, "
        "and the other fields)"
    )

    @model_validator(mode="after")
    def _body_bound(self) -> Limits:
        if self.max_body_bytes is None:
            self.max_body_bytes = self.max_image_bytes * 3 // 2 + FIELDS_SLACK_BYTES
        return self

    def body_limit(self) -> int:
        """`max_body_bytes` as it stands after validation, given or derived: never None."""
        assert self.max_body_bytes is not None  # _body_bound derives it when unset
        return self.max_body_bytes


class GenerationOverrides(_Section):
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)


class ApiSettings(_Section):
    """The `api:` section of a serving config (see factory/routing/app.py)."""

    keys: list[ApiKey] = Field(default_factory=list, description="API keys (hashes) and their tenants")
    max_in_flight: int = Field(
        default=8, ge=1, description="Requests a tenant may have in flight at once, per ingress replica (429 past it)"
    )
    tenant_max_in_flight: dict[str, int] = Field(default_factory=dict, description="Per-tenant override of max_in_flight")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After on 429 and 503")
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="A request still waiting on a replica after this long is 504"
    )
    ready_probe_timeout_s: float = Field(default=2.0, gt=0, description="How long /readyz waits for a replica")
    input_prefixes: list[str] | None = Field(
        default=None,
        description="s3:// prefixes that narrow every tenant's `inputs` from the tenants registry: an image_uri "
        "must lie under both. Unset: the registry's roots as they are; without a registry, these are every key's "
        "roots. A tenant left with no s3:// root takes base64 inputs only",
    )
    output_prefix: str | None = Field(
        default=None, description="Local folder or s3:// prefix that `output: uri` images go under "
        "(<prefix>/images/<tenant>/<id>.png); unset: only base64 output"
    )
    defaults: GenerationOverrides = Field(default_factory=GenerationOverrides, description="Replace the profile's")
    limits: Limits = Field(default_factory=Limits)
    http: HttpOptions = Field(default_factory=HttpOptions)
    grpc: GrpcOptions = Field(default_factory=GrpcOptions)
    public_docs: bool = Field(
        default=False, description="Serve /openapi.json and /docs without a key (by default only /healthz and "
        "/readyz answer without one)"
    )
    route_prefix: str = Field(default="/", pattern=r"^/", description="Where the app's HTTP routes start")
    ingress_replicas: int = Field(default=1, ge=1, description="Replicas of the (CPU-light) FastAPI ingress")
    ingress_max_ongoing_requests: int = Field(default=256, ge=1)

    @field_validator("input_prefixes")
    @classmethod
    def _s3_prefixes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for prefix in value:
            if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", prefix):
                raise ValueError(f"{prefix!r} must be an s3://bucket/prefix")
        return [normalise_root(prefix) for prefix in value]

    def input_roots(self, tenant: str, registry_roots: tuple[str, ...] | None) -> InputRoots:
        """Where an image_uri of `tenant`'s keys may point: the tenant's registry `inputs` (`registry_roots`; None
        when the server has no registry) that are s3://, narrowed by input_prefixes when set; without a registry,
        input_prefixes alone. The same `InputRoots.check` as batch rows then judges each URI."""
        owner = f"tenant {tenant}"
        if registry_roots is None:
            return InputRoots(owner, tuple(self.input_prefixes or ()))
        roots = InputRoots(owner, tuple(root for root in registry_roots if root.startswith("s3://")))
        return roots if self.input_prefixes is None else roots.narrowed(self.input_prefixes)

    @model_validator(mode="after")
    def _grpc_listens_where_http_does(self) -> ApiSettings:
        grpc, host = self.grpc, self.http.host
        if grpc.enabled and host not in ALL_INTERFACES and not grpc.all_interfaces:
            raise ValueError(
                f"grpc: Serve's gRPC proxy listens on every interface ({grpc.bind_address()}), not on http.host "
                f"{host}; set grpc.all_interfaces: true to accept that (and firewall port {grpc.port}), or leave "
                "grpc.enabled off"
            )
        return self

    def in_flight_limit(self, tenant: str) -> int:
        return self.tenant_max_in_flight.get(tenant, self.max_in_flight)

    def grpc_max_message_bytes(self) -> int:
        """Serve's gRPC proxy takes one size for messages both ways: the body bound, or the largest PNG a
        generation within the limits can answer with (RGBA, uncompressed), whichever is larger."""
        largest_png = self.limits.max_side * self.limits.max_side * 4 + FIELDS_SLACK_BYTES
        return max(self.limits.body_limit(), largest_png)


def body_fields(body: BaseModel) -> dict[str, Any]:
    """The fields a caller set, as a manifest row would carry them."""
    return body.model_dump(exclude_none=True, exclude={"output", "image_base64", "image_uri", "images"})
