"""A bound on what Serve's HTTP proxy reads ahead of the app, installed on the proxy itself.

Serve's proxy (another process) reads a request's body into an unbounded queue as fast as the client sends it,
and the ingress replica pulls from that queue ahead of the app, until the app answers. The gate
(`factory/routing/gate.py`) answers an oversized body within milliseconds, but what arrives in those
milliseconds is the proxy's and the replica's to hold: with the two cores busy, a 1 GiB upload had 76 MiB in
before the 413 went out and grew each process by ~150 MiB. So the proxy stops reading a body past the server's
limit: the rest waits in the client's socket (TCP backpressure) while the app, which has seen more than its limit,
answers 413. Serve installs proxy middleware through `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` in the proxy's
environment (its controller's runtime env); `factory.routing.app.proxy_options` sets it with the limit.

One proxy serves every app on a cluster, and Serve keeps the options it first started with. An app whose own
limit is larger than the proxy's never sees the rest of such a body: if it has not answered within
`answer_within_s` of the proxy's stopping, the proxy answers 413 itself, with the same error body as the gate.
"""

from __future__ import annotations

import asyncio
import os

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from factory.routing.gate import body_too_large, error_response

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LIMIT_VARIABLE = "FACTORY_PROXY_MAX_BODY_BYTES"
CALLBACK = "factory.routing.proxy_bound.proxy_middlewares"
# How long the app has to answer a body the proxy stopped reading, before the proxy answers for it: the gate
# answers in milliseconds, so this is only for an app that waits for bytes the proxy will never pass on.
ANSWER_WITHIN_S = 10.0


def proxy_environment(max_body_bytes: int) -> dict[str, str]:
    """The env vars, for the Serve controller's runtime env, that put the bound on the proxies it starts."""
    return {CALLBACK_VARIABLE: CALLBACK, LIMIT_VARIABLE: str(max_body_bytes)}


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: called once in each proxy process as it starts."""
    return [Middleware(ProxyBodyBound, max_body_bytes=int(os.environ[LIMIT_VARIABLE]))]


class ProxyBodyBound:
    """Pure ASGI middleware for the proxy: passes body chunks through until more than `max_body_bytes` have
    passed, then reads no more of that request (so the socket applies backpressure) until the response is
    done. Serve cancels the proxy's pending read once the response is sent."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, answer_within_s: float = ANSWER_WITHIN_S) -> None:
        self.app, self.max_body_bytes, self.answer_within_s = app, max_body_bytes, answer_within_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stopped = asyncio.Event()
        passed = 0
        response_started = False

        async def bounded_receive() -> Message:
            nonlocal passed
            if passed > self.max_body_bytes:
                stopped.set()
                await asyncio.Future()  # never done: cancelled with the request
            message = await receive()
            if message["type"] == "http.request":
                passed += len(message.get("body", b""))
            return message

        async def noting_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        exchange = asyncio.ensure_future(self.app(scope, bounded_receive, noting_send))
        stop = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({exchange, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not exchange.done():
                await asyncio.wait({exchange}, timeout=self.answer_within_s)
            if exchange.done() or response_started:
                await exchange
                return
            exchange.cancel()
            await asyncio.gather(exchange, return_exceptions=True)
            await error_response(body_too_large(self.max_body_bytes))(scope, receive, send)
        finally:
            stop.cancel()
            if not exchange.done():
                exchange.cancel()
