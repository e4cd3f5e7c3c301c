"""The API's door, as ASGI middleware in front of every route: refusals that need only the request's head.

FastAPI reads and parses a body before it solves a route's dependencies, so a key checked in a dependency comes
after the body has been read whole and validated. The gate runs first, on the headers alone:

1. a route that is not public (health, and the docs when the server says so) needs a valid key: 401, before a
   byte of the body is read, whatever the body's size or shape;
2. a declared `Content-Length` over the server's body limit: 413 at once, without reading it;
3. a body without a declared length (chunked) is counted as the route reads it, and refused with 413 at the
   limit, by Starlette's own `RequestBodyLimitMiddleware`.

Authentication comes first: an anonymous request learns nothing about the server's limits, and a declared
oversized body is refused unread either way. Serve's HTTP proxy (another process) reads no further into a body
than the limit (factory.routing.proxy_bound), so what it and this replica hold stays within about the limit.
"""

from __future__ import annotations

from typing import Callable, Protocol

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from factory.routing.api_models import ApiError
from factory.routing.auth import presented_key

# Where the gate leaves the authenticated tenant for the route (`request.state`, ASGI's "state" scope key).
TENANT_STATE = "factory_tenant"
# WebSocket close code "policy violation": the API serves no WebSocket route, so none gets past the gate.
_POLICY_VIOLATION = 1008
# Public routes are read-only: a POST to a public path needs a key like any other.
_PUBLIC_METHODS = frozenset({"GET", "HEAD"})


class Door(Protocol):
    """What the gate asks of the ingress that serves this replica."""

    def tenant_for(self, key: str | None) -> str:
        """The key's tenant, or ApiError 401."""
        ...

    def public_paths(self) -> frozenset[str]:
        """Route paths (below the app's route prefix) that answer GET without a key."""
        ...

    def max_body_bytes(self) -> int:
        ...


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(mode="json"), status_code=error.status, headers=error.headers)


def body_too_large(limit: int, declared: int | None = None) -> ApiError:
    size = f"{declared} bytes" if declared is not None else "more bytes"
    return ApiError(413, "too_large", f"body: {size}, this server takes at most {limit}", "body")


def declared_length(headers: Headers) -> int | None:
    """The declared Content-Length; None when absent (chunked) or unreadable (Serve's HTTP server refuses those)."""
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


def route_path(scope: Scope) -> str:
    """The request's path below the app's route prefix (Serve puts the prefix in `root_path`), as routing sees
    it: a path is public only when it is exactly a public route's path, so anything else fails closed."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class RequestGate:
    """Pure ASGI middleware (it wraps `receive`, never reads the body itself). `door` finds this replica's
    ingress (None while it starts: 503)."""

    def __init__(self, app: ASGIApp, *, door: Callable[[], Door | None]) -> None:
        self.app, self.door = app, door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        door = self.door()
        if door is None:
            starting = ApiError(503, "not_ready", "the API is starting", headers={"Retry-After": "1"})
            await error_response(starting)(scope, receive, send)
            return
        headers = Headers(scope=scope)
        public = scope["method"] in _PUBLIC_METHODS and route_path(scope) in door.public_paths()
        if not public:
            try:
                tenant = door.tenant_for(presented_key(headers.get("authorization"), headers.get("x-api-key")))
            except ApiError as error:
                await error_response(error)(scope, receive, send)
                return
            scope.setdefault("state", {})[TENANT_STATE] = tenant
        limit, declared = door.max_body_bytes(), declared_length(headers)
        if declared is not None and declared > limit:
            await error_response(body_too_large(limit, declared))(scope, receive, send)
            return
        await RequestBodyLimitMiddleware(self.app, max_body_size=limit)(scope, receive, send)
