"""The online door: a FastAPI ingress deployment in the same Serve application as `StackReplica`, answering HTTP
(`/v1/tasks`, `/v1/generate`, `/v1/caption`, `/v1/answer`, `/v1/edit`, `/healthz`, `/readyz`, `/openapi.json`,
`/docs`) and, through Serve's gRPC proxy, the `factory.v1.Factory` service (proto/factory_api.proto) with the same
methods.

A request goes: API key -> tenant (401) and a declared body size (413), from the headers alone before any body
byte is read (factory.routing.gate; only /healthz and /readyz answer without a key) -> the body, counted as it
is read (413 at the limit) -> body shape (422) -> the tenant's in-flight bound (429) -> replicas ready (503) ->
the task parser and the tenants registry, as for a manifest row, and whether the profile can run the task (400,
403, 404) -> input image (an edit's: every reference) read and its header checked (403 outside the tenant's
roots, 413) -> `StackReplica` through a handle, multiplexed on the adapter -> the replica's
`TaskResult` (safety already applied there: a blocked result has no image) -> JSON or protobuf. Every error is
one JSON body `{status, code, message, field}`, never a traceback; over gRPC it is the details of a gRPC status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import uuid

import structlog
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from factory.errors import InputError, StorageUnavailable, one_line, validation_problems
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.model.generator import fit_size
from factory.model.profiles import get_profile
from factory.routing.api_models import (
    BODY_TASK, AnswerBody, ApiError, ApiSettings, CaptionBody, EditBody, ErrorBody, GenerateBody, HealthBody,
    TaskBody, TaskResponse, _Body, body_fields, response_of,
)
from factory.routing.auth import Keyring, presented_key
from factory.routing.batch import ReplicaCall, adapter_key
from factory.routing.capabilities import check_capabilities
from factory.routing.gate import TENANT_STATE, RequestGate, body_too_large, error_response
from factory.routing.parser import GenerationDefaults, RequestError, parse_request, with_adapter
from factory.routing.requests import Status, Task, TaskRequest, TaskResult
from factory.routing.tenants import TenantRegistry

log = structlog.get_logger(__name__)

INGRESS_NAME = "ApiIngress"
# Routes that answer without a key; with `api.public_docs` the schema and its pages too.
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


def problems_error(error: ValidationError | RequestValidationError, status: int = 422) -> ApiError:
    """Pydantic's problems as one line naming the first field (the body's own fields, without FastAPI's "body")."""
    details = error.errors()
    if any(detail.get("type") == "json_invalid" for detail in details):
        return ApiError(400, "invalid_json", "body: not valid JSON", "body")
    problems = []
    for detail in details:
        loc = tuple(detail.get("loc") or ())
        if loc[:1] == ("body",):
            loc = loc[1:]
        problems.append({**detail, "loc": loc})

    class _Shim:  # validation_problems reads .errors(); RequestValidationError's are plain dicts already
        def errors(self, include_url: bool = False) -> list[dict]:
            return problems

    found = validation_problems(_Shim())  # type: ignore[arg-type]
    first = found[0] if found else None
    field = (first.field or "body") if first is not None else "body"
    return ApiError(status, "invalid_request", one_line(found) or "invalid request", field)


api = FastAPI(
    title="factory",
    version="1",
    description="The factory's online API: generate images, edit them from reference images, caption images and "
    "answer questions about them, with the same replicas, tenants, adapters and safety policy as batch jobs. "
    "Authenticate with `Authorization: Bearer <key>` (or `X-API-Key`). Errors are `{status, code, message, field}`.",
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return error_response(error)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(problems_error(error))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
    if error.status_code == 413 and limit is not None:  # the gate's counted body limit, hit while reading
        return error_response(body_too_large(limit))
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    message = error.detail if isinstance(error.detail, str) else "request refused"
    return error_response(ApiError(error.status_code, code, message, headers=dict(error.headers or {})))


@api.exception_handler(Exception)
async def _unexpected(_: Request, error: Exception) -> JSONResponse:
    log.error("unexpected error in the API", error=repr(error))
    return error_response(ApiError(500, "internal", f"internal error ({type(error).__name__})"))


def _replica_door():
    """This replica's `ApiIngress` (the gate's `Door`), None while it starts."""
    try:
        ingress = serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - outside a replica (never in service)
        return None
    return ingress if hasattr(ingress, "tenant_for") else None  # Serve rebuilds the class by value: no isinstance


api.add_middleware(RequestGate, door=_replica_door)


def authenticated_tenant(
    request: Request,
    authorization: str | None = Header(default=None, description="Bearer <API key>"),
    x_api_key: str | None = Header(default=None, description="Or the API key alone"),
) -> str:
    """The tenant the gate authenticated from these headers before the body was read (they are declared here
    for the schema). A route that takes a tenant but was let through as public gets 401, never a default."""
    tenant = request.scope.get("state", {}).get(TENANT_STATE)
    if tenant is None:
        raise ApiError(401, "unauthenticated", "an API key is required (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    return tenant


_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 422, 429, 500, 503, 504)}


# Helpers come before the class: Serve rebuilds the ingress class by value in its replicas.


def _awaitable(response):
    async def wait():
        return await response

    return wait()


def _b64decode(text: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    if len(compact) * 3 // 4 > max_bytes + 2:
        raise ApiError(413, "too_large", f"image_base64: about {len(compact) * 3 // 4} bytes, this server takes at "
                       f"most {max_bytes}", "image_base64")
    compact = compact.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_request", "image_base64: not valid base64", "image_base64") from None


def check_image_header(data: bytes, field: str, max_pixels: int) -> tuple[int, int]:
    """A readable image of an accepted format within the pixel cap, judged from its header (no pixels decoded); its
    width and height."""
    from PIL import Image, UnidentifiedImageError

    from factory.io.images import IMAGE_FORMATS

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise ApiError(413, "too_large", f"{field}: image too large", field) from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", f"{field}: not an image (or not one of {', '.join(IMAGE_FORMATS)})",
                       field) from None
    except Exception:  # noqa: BLE001 - Pillow reports broken headers as many kinds of errors
        raise ApiError(400, "invalid_image", f"{field}: corrupt image header", field) from None
    if width * height > max_pixels:
        raise ApiError(413, "too_large", f"{field}: {width}x{height} pixels, this server takes at most {max_pixels}",
                       field)
    return width, height


def _set_grpc_error(grpc_context, error: ApiError) -> None:
    from factory.routing.grpc_service import grpc_code

    grpc_context.set_code(grpc_code(error.status))
    grpc_context.set_details(json.dumps(error.body().model_dump(mode="json")))
    trailing = [("http-status", str(error.status))]
    if "Retry-After" in error.headers:
        trailing.append(("retry-after", error.headers["Retry-After"]))
    grpc_context.set_trailing_metadata(trailing)


@serve.ingress(api)  # here, at import: every process that imports this module gets the same converted routes
class ApiIngress:
    """The ingress deployment (made a `serve.deployment` with the config's sizing in factory.routing.app)."""

    def __init__(self, replica, config: dict) -> None:
        from factory.logs import configure_logging
        import os

        configure_logging(os.environ.get("FACTORY_LOG_LEVEL", "warning"))
        self.replica = replica  # DeploymentHandle of StackReplica
        self.settings = ApiSettings.model_validate(config["api"])
        self.defaults = GenerationDefaults.model_validate(config["defaults"])
        self.profile = get_profile(config["profile"])
        tenants = config.get("tenants")
        self.registry = (TenantRegistry.from_dict(tenants, config.get("tenants_dir") or ".", "tenants")
                         if tenants is not None else None)
        self.keyring = Keyring(self.settings.keys)
        self.storage = Storage()
        self.in_flight: dict[str, int] = {}
        self.handles: dict[str, object] = {}
        self.ready = False

    # ---- HTTP ---------------------------------------------------------------------------------------------

    @api.get("/healthz", response_model=HealthBody, tags=["health"])
    async def healthz(self) -> HealthBody:
        """The ingress is up (says nothing about the model replicas: see /readyz)."""
        return HealthBody(status="ok")

    @api.get("/readyz", response_model=HealthBody, tags=["health"], responses={503: {"model": HealthBody}})
    async def readyz(self):
        """Ready once a model replica has loaded its models and answers."""
        ready, message = await self.probe()
        if not ready:
            return JSONResponse(HealthBody(status="not_ready", message=message).model_dump(), status_code=503,
                                headers={"Retry-After": str(self.settings.retry_after_s)})
        return HealthBody(status="ready")

    @api.post("/v1/tasks", response_model=TaskResponse, response_model_exclude_none=True, tags=["tasks"],
              responses=_ERRORS)
    async def tasks(self, body: TaskBody, tenant: str = Depends(authenticated_tenant)) -> TaskResponse:
        """Any task, decided by the task parser (explicit `task`; else "Question:" / "Describe:" prompts; else
        generation)."""
        return await self.run(tenant, body)

    @api.post("/v1/generate", response_model=TaskResponse, response_model_exclude_none=True, tags=["tasks"],
              responses=_ERRORS)
    async def generate(self, body: GenerateBody, tenant: str = Depends(authenticated_tenant)) -> TaskResponse:
        """An image from a prompt, with the tenant's adapter (named, by region, or its default)."""
        return await self.run(tenant, body)

    @api.post("/v1/caption", response_model=TaskResponse, response_model_exclude_none=True, tags=["tasks"],
              responses=_ERRORS)
    async def caption(self, body: CaptionBody, tenant: str = Depends(authenticated_tenant)) -> TaskResponse:
        """A caption of an image."""
        return await self.run(tenant, body)

    @api.post("/v1/answer", response_model=TaskResponse, response_model_exclude_none=True, tags=["tasks"],
              responses=_ERRORS)
    async def answer(self, body: AnswerBody, tenant: str = Depends(authenticated_tenant)) -> TaskResponse:
        """An answer to a question about an image."""
        return await self.run(tenant, body)

    @api.post("/v1/edit", response_model=TaskResponse, response_model_exclude_none=True, tags=["tasks"],
              responses=_ERRORS)
    async def edit(self, body: EditBody, tenant: str = Depends(authenticated_tenant)) -> TaskResponse:
        """An image from one reference (`image_base64` or `image_uri`) or several (`images`, on profiles that take
        them) and an instruction, with the tenant's adapter; each reference is checked as an input image."""
        return await self.run(tenant, body)

    # ---- gRPC (Serve's gRPC proxy calls the method named like the RPC) -----------------------------------

    async def Task(self, message, grpc_context=None):  # noqa: N802 - the RPC's name
        return await self._grpc(TaskBody, message, grpc_context)

    async def Generate(self, message, grpc_context=None):  # noqa: N802
        return await self._grpc(GenerateBody, message, grpc_context)

    async def Caption(self, message, grpc_context=None):  # noqa: N802
        return await self._grpc(CaptionBody, message, grpc_context)

    async def Answer(self, message, grpc_context=None):  # noqa: N802
        return await self._grpc(AnswerBody, message, grpc_context)

    async def Edit(self, message, grpc_context=None):  # noqa: N802
        return await self._grpc(EditBody, message, grpc_context)

    async def Ready(self, message, grpc_context=None):  # noqa: N802
        """Needs a key like every method of the service; keyless health is Serve's RayServeAPIService/Healthz."""
        from factory.routing.proto import factory_api_pb2 as pb

        try:
            self.grpc_tenant(grpc_context)
        except ApiError as error:
            if grpc_context is not None:
                _set_grpc_error(grpc_context, error)
            return pb.ReadyResponse()
        ready, text = await self.probe()
        if not ready and grpc_context is not None:
            _set_grpc_error(grpc_context, ApiError(503, "not_ready", text, headers={
                "Retry-After": str(self.settings.retry_after_s)}))
        return pb.ReadyResponse(ready=ready, message=text)

    async def _grpc(self, body_type: type[_Body], message, grpc_context):
        from factory.routing.grpc_service import body_from_message

        from factory.routing.proto import factory_api_pb2 as pb

        try:
            tenant = self.grpc_tenant(grpc_context)
            fields, raw_image, raw_references = body_from_message(message)
            if raw_image is not None and body_type in (GenerateBody,):
                raise ApiError(422, "invalid_request", "image: unknown field", "image")
            if raw_image is not None and fields.get("image_uri") is not None:
                raise ApiError(422, "invalid_request", "image and image_uri: give one, not both", "image")
            try:
                body = body_type.model_validate(fields)
            except ValidationError as error:
                raise problems_error(error) from None
            return await self.run(tenant, body, raw_image=raw_image, raw_references=raw_references, grpc=True)
        except ApiError as error:
            if grpc_context is not None:
                _set_grpc_error(grpc_context, error)
            return pb.TaskResponse()
        except Exception as error:  # noqa: BLE001 - one status, never a traceback
            log.error("unexpected error in the gRPC API", error=repr(error))
            if grpc_context is not None:
                _set_grpc_error(grpc_context, ApiError(500, "internal", f"internal error ({type(error).__name__})"))
            return pb.TaskResponse()

    # ---- the door -----------------------------------------------------------------------------------------

    def tenant_for(self, key: str | None) -> str:
        if key is None:
            raise ApiError(401, "unauthenticated", "an API key is required (Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})
        tenant = self.keyring.tenant_of(key)
        if tenant is None:
            raise ApiError(401, "unauthenticated", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return tenant

    def grpc_tenant(self, grpc_context) -> str:
        """The tenant of a gRPC call's metadata key (Serve's gRPC proxy has no hook before the ingress)."""
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        return self.tenant_for(presented_key(metadata.get("authorization"), metadata.get("x-api-key")))

    def public_paths(self) -> frozenset[str]:
        docs = {api.openapi_url, api.docs_url, api.swagger_ui_oauth2_redirect_url, api.redoc_url}
        return HEALTH_PATHS | (frozenset(path for path in docs if path) if self.settings.public_docs else frozenset())

    def max_body_bytes(self) -> int:
        return self.settings.limits.body_limit()

    async def probe(self) -> tuple[bool, str]:
        """Whether a model replica answers within the probe timeout; remembered once true."""
        try:
            response = self.replica.deployed_fingerprint.remote()
            try:
                await asyncio.wait_for(_awaitable(response), self.settings.ready_probe_timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                return False, "no model replica has loaded its models yet"
        except Exception as error:  # noqa: BLE001 - a replica mid-restart, Serve shedding: not ready
            log.warning("readiness probe failed", error=repr(error)[:500])
            return False, f"model replicas unavailable ({type(error).__name__}: {error})"
        self.ready = True
        return True, "ready"

    async def run(self, tenant: str, body: _Body, raw_image: bytes | None = None,
                  raw_references: list[bytes | None] | None = None, grpc: bool = False):
        """`raw_image` and `raw_references` (aligned with `body.images`): image bytes a gRPC message carried."""
        limit = self.settings.in_flight_limit(tenant)
        if self.in_flight.get(tenant, 0) >= limit:
            raise ApiError(429, "too_many_requests", f"tenant {tenant!r} already has {limit} requests in flight",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        try:
            if body.output == "uri" and self.settings.output_prefix is None:
                raise ApiError(400, "invalid_request", "output: this server has no output prefix; use output: base64",
                               "output")
            if not self.ready:
                ready, message = await self.probe()
                if not ready:
                    raise ApiError(503, "not_ready", message, headers={"Retry-After": str(self.settings.retry_after_s)})
            request = self.request_of(tenant, body, raw_image)
            if request.task is Task.EDIT:
                references = await self.reference_images(request, body, raw_image, raw_references)
                request = self.sized_edit(request, references[0])
                result = await self.call(request, references=[data for data, _ in references])
            else:
                result = await self.call(request, await self.input_image(request, body, raw_image))
            return await self.respond(result, body.output, grpc)
        finally:
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]

    def request_of(self, tenant: str, body: _Body, raw_image: bytes | None) -> TaskRequest:
        """The body as a manifest row, through the same parser and registry."""
        row = body_fields(body)
        row["tenant"], row["id"] = tenant, body.id or uuid.uuid4().hex
        task = BODY_TASK[type(body)]
        if task is not None:
            row["task"] = task
        adapter = row.pop("adapter", None)
        if adapter is not None and "/" in adapter:
            owner, _, adapter = adapter.partition("/")
            if owner != tenant:
                raise ApiError(403, "forbidden", f"adapter: {owner}/{adapter} belongs to another tenant", "adapter")
        if adapter is not None:
            row["adapter"] = adapter
        image_base64 = getattr(body, "image_base64", None)
        image_uri = getattr(body, "image_uri", None)
        if raw_image is not None or image_base64 is not None:
            row["image"] = "upload"
        elif image_uri is not None:
            row["image"] = image_uri
        references = getattr(body, "images", None)
        if references is not None:  # an uploaded reference is named by its place, as its errors are
            row["images"] = [ref.image_uri or f"upload:{index}" for index, ref in enumerate(references)]
        try:
            request = parse_request(row, self.defaults)
            if request.task in (Task.GENERATE, Task.EDIT):
                self.check_limits(request)
            check_capabilities(request, self.profile)  # before any input is read or a replica called
            request = with_adapter(request, self.registry)
        except RequestError as error:
            if error.field == "adapter":
                raise ApiError(404, "adapter_not_found", str(error), "adapter") from None
            if error.field == "tenant":
                raise ApiError(403, "forbidden", str(error), "tenant") from None
            raise ApiError(400, "invalid_request", str(error), error.field) from None
        return request

    def check_limits(self, request: TaskRequest) -> None:
        limits = self.settings.limits
        for field in ("width", "height"):
            value = getattr(request, field)
            if value is not None and value > limits.max_side:
                raise RequestError(field, f"at most {limits.max_side} on this server, got {value}")
        if request.steps is not None and request.steps > limits.max_steps:
            raise RequestError("steps", f"at most {limits.max_steps} on this server, got {request.steps}")

    async def input_image(self, request: TaskRequest, body: _Body, raw_image: bytes | None) -> bytes | None:
        if request.image is None:
            return None
        data, _ = await self.read_input(request.tenant, raw_image, getattr(body, "image_base64", None),
                                        getattr(body, "image_uri", None))
        return data

    async def reference_images(self, request: TaskRequest, body: _Body, raw_image: bytes | None,
                               raw_references: list[bytes | None] | None) -> list[tuple[bytes, tuple[int, int]]]:
        """An edit's references, each read and checked as an input image is (bytes, then its header's size); an
        error names the reference (`images[i]` among several)."""
        references = getattr(body, "images", None)
        if references is None:  # one reference, in the body's image fields
            return [await self.read_input(request.tenant, raw_image, getattr(body, "image_base64", None),
                                          getattr(body, "image_uri", None))]
        read = []
        for index, reference in enumerate(references):
            raw = raw_references[index] if raw_references else None
            read.append(await self.read_input(request.tenant, raw, reference.image_base64, reference.image_uri,
                                              field=f"images[{index}]"))
        return read

    async def read_input(self, tenant: str, raw: bytes | None, image_base64: str | None, image_uri: str | None,
                         field: str | None = None) -> tuple[bytes, tuple[int, int]]:
        """One input image from gRPC bytes, base64 or an s3:// URI, within the size and pixel caps; its bytes and
        size. `field` names it in errors (default: the body field it came from)."""
        limits = self.settings.limits
        if raw is not None:
            data, field = raw, field or "image"
        elif image_base64 is not None:
            data, field = _b64decode(image_base64, limits.max_image_bytes), field or "image_base64"
        elif image_uri is not None:
            field = field or "image_uri"
            data = await self.read_uri(image_uri, tenant, field)
        else:  # a reference of `images` with neither
            field = field or "image"
            raise ApiError(400, "invalid_request", f"{field}: give image_base64 or image_uri (over gRPC: image or "
                           "image_uri)", field)
        if len(data) > limits.max_image_bytes:
            raise ApiError(413, "too_large", f"{field}: {len(data)} bytes, this server takes at most "
                           f"{limits.max_image_bytes}", field)
        return data, check_image_header(data, field, limits.max_image_pixels)

    def sized_edit(self, request: TaskRequest, first: tuple[bytes, tuple[int, int]]) -> TaskRequest:
        """An edit without a size gets the first reference's aspect ratio within the server's default size's pixels
        and its `max_side`, decided here, where the limits are known, rather than by the generator."""
        if request.width is not None and request.height is not None:
            return request
        width, height = fit_size(*first[1], self.defaults.width * self.defaults.height,
                                 max_side=self.settings.limits.max_side)
        return request.model_copy(update={"width": width, "height": height})

    async def read_uri(self, uri: str, tenant: str, field: str = "image_uri") -> bytes:
        """The object at an s3:// `uri` that lies under `tenant`'s input roots (403 otherwise, before any read)."""
        if not uri.startswith("s3://"):
            raise ApiError(400, "invalid_request", f"{field}: must be an s3:// URI", field)
        registry_roots = self.registry.input_roots(tenant) if self.registry is not None else None
        try:
            uri = self.settings.input_roots(tenant, registry_roots).check(uri)
        except InputError as error:
            raise ApiError(403, "forbidden", f"{field}: {error}", field) from None
        max_bytes = self.settings.limits.max_image_bytes
        try:
            size, _ = await asyncio.to_thread(self.storage.stat, uri)
            if size > max_bytes:
                raise ApiError(413, "too_large", f"{field}: {size} bytes, this server takes at most {max_bytes}",
                               field)
            return await asyncio.to_thread(self.storage.read_bytes, uri, max_bytes)
        except StorageUnavailable as error:
            raise ApiError(503, "storage_unavailable", str(error), field,
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except InputError as error:
            raise ApiError(400, "invalid_request", f"{field}: {error}", field) from None

    async def call(self, request: TaskRequest, image: bytes | None = None,
                   references: list[bytes] | None = None) -> TaskResult:
        """One call to the replicas, multiplexed on the adapter; a fault is a clear 5xx, never a hang."""
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors

        retry = {"Retry-After": str(self.settings.retry_after_s)}
        key = adapter_key(request)
        handle = self.handles.get(key)
        if handle is None:  # one handle per adapter, made once (options() builds a new handle object)
            handle = self.handles[key] = self.replica.options(multiplexed_model_id=key)
        response = handle.remote(ReplicaCall(request=request, image_bytes=image, reference_bytes=references))
        try:
            return await asyncio.wait_for(_awaitable(response), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "timeout", f"no result within {self.settings.request_timeout_s:g} s") from None
        except serve_errors.BackPressureError:
            raise ApiError(503, "overloaded", "the model replicas are at capacity; retry shortly",
                           headers=retry) from None
        except (ray_errors.ActorDiedError, ray_errors.ActorUnavailableError, ray_errors.RayActorError,
                serve_errors.ReplicaUnavailableError, serve_errors.DeploymentUnavailableError,
                serve_errors.RequestCancelledError) as error:
            raise ApiError(503, "replica_unavailable",
                           f"the model replica serving this request stopped ({type(error).__name__}); retry",
                           headers=retry) from None
        except ray_errors.RayTaskError as error:
            cause = type(getattr(error, "cause", None) or error).__name__
            log.error("replica call failed", error=repr(error)[:2000])
            raise ApiError(500, "replica_error", f"the model call failed ({cause})") from None

    async def respond(self, result: TaskResult, output: str, grpc: bool = False):
        """A `TaskResponse` (the PNG in base64) or, for `grpc`, the protobuf message with the PNG's own bytes."""
        if result.status is Status.REJECTED:
            message = result.error or "rejected"
            field = message.split(":", 1)[0] if ":" in message else None
            if field is not None and (field == "image" or field.startswith("images[")):
                status = 413 if "too large" in message else 400
                raise ApiError(status, "too_large" if status == 413 else "invalid_image", message, field)
            # An adapter the registry names but the replica cannot use: the server's configuration, not the caller.
            raise ApiError(500, "adapter_unusable", message, "adapter")
        if result.status is Status.FAILED:
            raise ApiError(500, "model_failed", f"the model call failed: {(result.error or '')[:300]}")
        image_b64 = image_uri = png = None
        if result.status is Status.OK and result.image_png is not None:
            if output == "uri":
                image_uri = await self.store(result)
            elif grpc:
                png = result.image_png
            else:
                image_b64 = base64.b64encode(result.image_png).decode("ascii")
        response = response_of(result, image_base64=image_b64, image_uri=image_uri)
        if not grpc:
            return response
        from factory.routing.grpc_service import response_message

        message = response_message(response)
        if png is not None:
            message.image = png
        return message

    async def store(self, result: TaskResult) -> str:
        assert self.settings.output_prefix is not None  # run() refuses output "uri" without one
        uri = OutputLayout(self.settings.output_prefix).image(result.tenant, result.id)
        try:
            await asyncio.to_thread(self.storage.write_bytes, uri, result.image_png)
        except (InputError, StorageUnavailable) as error:
            raise ApiError(503, "storage_unavailable", f"output: {error}",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        return uri
