"""The gRPC side of the online API: protobuf messages to the HTTP API's bodies and back, and status codes.

Serve's gRPC proxy (started with `grpc_servicer_functions` naming `add_FactoryServicer_to_server` of
proto/factory_api_pb2_grpc.py) calls the ingress deployment's method named like the RPC; the ingress turns the
message into the same pydantic body as an HTTP request (`body_from_message`), so both doors share validation,
the task parser, the tenants registry and error messages.
"""

from __future__ import annotations

import base64
from typing import Any

import grpc

from factory.routing.api_models import TaskResponse
from factory.routing.proto import factory_api_pb2 as pb

SERVICER_FUNCTION = "factory.routing.proto.factory_api_pb2_grpc.add_FactoryServicer_to_server"

# HTTP status of the API's error -> gRPC status (Google's usual mapping; 413 like gRPC's own "message too large").
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(http_status: int) -> grpc.StatusCode:
    return _CODES.get(http_status, grpc.StatusCode.INTERNAL)


def body_from_message(message: pb.TaskRequest) -> tuple[dict[str, Any], bytes | None, list[bytes | None] | None]:
    """The fields the caller set (proto3 `optional` presence), as a JSON body would carry them, and the raw image
    bytes apart (JSON carries them as base64; gRPC need not): the image's, and each reference's of `images` (None
    for one given by `image_uri`), aligned with the body's `images`."""
    fields: dict[str, Any] = {descriptor.name: value for descriptor, value in message.ListFields()}
    image = fields.pop("image", None)
    if "guidance" in fields:  # a proto float: keep the decimal the caller wrote (3.5, not 3.5000000xx)
        fields["guidance"] = float(f"{fields['guidance']:.6g}")
    references = fields.pop("images", None)
    if references is None:
        return fields, image, None
    fields["images"] = [{"image_uri": r.image_uri} if r.HasField("image_uri") else {} for r in references]
    return fields, image, [r.image if r.HasField("image") else None for r in references]


def response_message(response: TaskResponse) -> pb.TaskResponse:
    values = response.model_dump(exclude_none=True, exclude={"image_base64", "safety"})
    message = pb.TaskResponse(**values)
    if response.image_base64 is not None:
        message.image = base64.b64decode(response.image_base64)
    if response.safety is not None:
        safety = response.safety
        message.safety.CopyFrom(pb.Safety(
            verdict=safety.verdict or "", decided_by=safety.decided_by or "", labels=safety.labels or [],
            scores=safety.scores or [], reason=safety.reason or "",
        ))
    return message
