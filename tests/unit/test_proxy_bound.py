"""The bound on Serve's proxy (factory.routing.proxy_bound) driven as ASGI, without Ray: in front of a proxy that
reads ahead into an unbounded queue, as Serve's does, and of the real gate, the client's body is read no further
than the limit; an app that waits for bytes the proxy will not pass on gets the proxy's 413."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from starlette.middleware import Middleware

from factory.routing.api import api
from factory.routing.gate import RequestGate
from factory.routing.proxy_bound import (
    CALLBACK,
    CALLBACK_VARIABLE,
    LIMIT_VARIABLE,
    ProxyBodyBound,
    proxy_environment,
    proxy_middlewares,
)

LIMIT = 100_000
CHUNK = 64 * 1024
GIB_OF_CHUNKS = (1 << 30) // CHUNK
# The other process's hop: Serve's ingress replica pulls each batch of messages from the proxy over an actor call.
HOP_S = 0.002


class Door:
    def tenant_for(self, key):
        return "acme"

    def public_paths(self):
        return frozenset()

    def max_body_bytes(self):
        return LIMIT


def ingress_app() -> RequestGate:
    """The real gate in front of a route that reads its body whole."""
    app = FastAPI(exception_handlers=dict(api.exception_handlers))

    @app.post("/v1/caption")
    async def caption(request: Request):
        return {"bytes": len(await request.body())}

    return RequestGate(app, door=Door)


def reading_ahead(ingress):
    """Serve's proxy as it behaves: a task reads the client's messages into an unbounded queue as fast as they
    come, the ingress gets them one hop later, and the reading task is cancelled once the response is sent."""

    async def proxy(scope, receive, send):
        queue: asyncio.Queue = asyncio.Queue()

        async def read_ahead():
            while True:
                message = await receive()
                queue.put_nowait(message)
                if message["type"] == "http.disconnect":
                    return

        async def pulled():
            await asyncio.sleep(HOP_S)
            return await queue.get()

        reader = asyncio.ensure_future(read_ahead())
        try:
            await ingress(scope, pulled, send)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    return proxy


class Client:
    """A client with its whole body already in the socket: each read is answered at once, and counted."""

    def __init__(self, chunks: int, chunk: bytes = b" " * CHUNK) -> None:
        self.left: int | None = chunks
        self.chunk, self.read = chunk, 0
        self.sent: list[dict] = []

    async def receive(self):
        if self.left == 0:
            self.left = None
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.left is None:  # as an ASGI server does: after the body, a read waits for the client to go
            await asyncio.Future()
        self.left -= 1
        self.read += 1
        return {"type": "http.request", "body": self.chunk, "more_body": True}

    async def send(self, message):
        self.sent.append(message)

    def answer(self) -> tuple[int, dict]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return start["status"], json.loads(body)


def request(app, client: Client) -> None:
    scope = {"type": "http", "method": "POST", "path": "/v1/caption", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5)}
    asyncio.run(app(scope, client.receive, client.send))


def test_without_the_bound_the_proxy_reads_the_whole_body_ahead_of_the_413():
    """What the bound is for: the read-ahead proxy alone takes in the client's whole gigabyte."""
    client = Client(GIB_OF_CHUNKS)
    request(reading_ahead(ingress_app()), client)
    assert client.answer()[0] == 413
    assert client.read == GIB_OF_CHUNKS


def test_the_proxy_reads_no_further_than_the_limit_and_the_gate_answers_413():
    client = Client(GIB_OF_CHUNKS)
    request(ProxyBodyBound(reading_ahead(ingress_app()), max_body_bytes=LIMIT), client)
    status, body = client.answer()
    assert status == 413 and body["field"] == "body" and str(LIMIT) in body["message"]
    assert client.read * CHUNK <= LIMIT + CHUNK  # the chunk that crosses the limit, and not one more


def test_a_body_within_the_limit_passes_whole():
    client = Client(LIMIT // CHUNK)
    request(ProxyBodyBound(reading_ahead(ingress_app()), max_body_bytes=LIMIT), client)
    assert client.answer() == (200, {"bytes": (LIMIT // CHUNK) * CHUNK})


def test_an_app_that_waits_for_more_than_the_proxy_passes_gets_the_proxys_413():
    """An app with a larger limit than the proxy's (one proxy serves every app on the cluster): it never sees
    the rest, so the proxy answers for it once its time is up, with the gate's error body."""
    waiting = FastAPI()

    @waiting.post("/v1/caption")
    async def caption(request: Request):
        return {"bytes": len(await request.body())}

    client = Client(GIB_OF_CHUNKS)
    request(ProxyBodyBound(reading_ahead(waiting), max_body_bytes=LIMIT, answer_within_s=0.2), client)
    status, body = client.answer()
    assert status == 413 and body["code"] == "too_large" and str(LIMIT) in body["message"]
    assert client.read * CHUNK <= LIMIT + CHUNK


def test_serve_installs_it_from_the_environment_factory_serve_gives_the_proxy(monkeypatch):
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    env = proxy_environment(LIMIT)
    assert env == {CALLBACK_VARIABLE: CALLBACK, LIMIT_VARIABLE: str(LIMIT)}
    monkeypatch.setenv(LIMIT_VARIABLE, env[LIMIT_VARIABLE])
    (middleware,) = validate_http_proxy_callback_return(call_function_from_import_path(env[CALLBACK_VARIABLE]))
    assert isinstance(middleware, Middleware) and middleware.cls is ProxyBodyBound
    assert middleware.kwargs == {"max_body_bytes": LIMIT}
    assert proxy_middlewares()[0].kwargs == {"max_body_bytes": LIMIT}
