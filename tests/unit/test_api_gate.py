"""The API's gate (factory.routing.gate) driven as ASGI, without Ray: keys before bodies, bodies bounded before
they are read whole, and the serving config's decisions on limits and on where gRPC listens."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest
from fastapi import Depends, FastAPI

from factory.errors import ConfigError
from factory.routing.api import HEALTH_PATHS, api, authenticated_tenant
from factory.routing.api_models import ApiSettings, GenerateBody, Limits
from factory.routing.app import GRPC_MESSAGE_SIZE_VARIABLE, load_serving, proxy_options
from factory.routing.auth import Keyring, new_key
from factory.routing.gate import RequestGate
from factory.routing.proxy_bound import proxy_environment

KEY = new_key("acme")
LIMIT = 100_000
CHUNK = 16 * 1024


@dataclass
class Door:
    """The three things the gate asks of an ingress, over a real keyring."""

    public: frozenset[str] = HEALTH_PATHS
    keyring: Keyring = field(default_factory=lambda: Keyring([KEY.entry]))

    def tenant_for(self, key):
        from factory.routing.api_models import ApiError

        tenant = self.keyring.tenant_of(key)
        if tenant is None:
            raise ApiError(401, "unauthenticated", "no", headers={"WWW-Authenticate": "Bearer"})
        return tenant

    def public_paths(self):
        return self.public

    def max_body_bytes(self):
        return LIMIT


def gated_app(door: Door | None) -> RequestGate:
    """A FastAPI app with the real API's error handlers and tenant dependency, behind the gate."""
    app = FastAPI(exception_handlers=dict(api.exception_handlers))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, tenant: str = Depends(authenticated_tenant)):
        return {"tenant": tenant, "prompt": body.prompt}

    return RequestGate(app, door=lambda: door)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict
    chunks_read: int


def call(app, method: str, path: str, *, key: str | None = None, chunks=(), declared: int | None = None,
         root_path: str = "", scope_type: str = "http") -> Answer:
    """One request through `app`, its body pulled from `chunks` only when the app asks (counted)."""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": scope_type, "method": method, "path": root_path + path, "root_path": root_path,
             "headers": headers, "query_string": b"", "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}
    pieces, read, sent = iter(chunks), [0], []

    async def receive():
        piece = next(pieces, None)
        if piece is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read[0] += 1
        return {"type": "http.request", "body": piece, "more_body": True}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    if scope_type == "websocket":
        return Answer(sent[0].get("code", 0), {}, {}, read[0])
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body), read[0])


def endless(piece: bytes = b" " * CHUNK):
    """A body far past the limit (it ends, so an app that reads it all answers instead of hanging)."""
    yield from [piece] * (4 * LIMIT // CHUNK)


def test_the_key_is_checked_before_a_byte_of_the_body_is_read():
    app = gated_app(Door())
    for chunks, declared in (([b"{not json"], 9), (endless(), None), (endless(), 10**9)):
        answer = call(app, "POST", "/v1/generate", chunks=chunks, declared=declared)
        assert (answer.status, answer.chunks_read) == (401, 0), answer
        assert answer.body["code"] == "unauthenticated" and answer.headers["www-authenticate"] == "Bearer"
    wrong = call(app, "POST", "/v1/generate", key=KEY.key[:-1] + ("0" if KEY.key[-1] != "0" else "1"), chunks=endless())
    assert (wrong.status, wrong.chunks_read) == (401, 0)


def test_with_a_key_the_body_is_parsed_and_validated_as_before():
    app = gated_app(Door())
    ok = call(app, "POST", "/v1/generate", key=KEY.key, chunks=[b'{"prompt": "a cat"}'])
    assert ok.status == 200 and ok.body == {"tenant": "acme", "prompt": "a cat"}
    assert call(app, "POST", "/v1/generate", key=KEY.key, chunks=[b"{not json"]).body["code"] == "invalid_json"
    assert call(app, "POST", "/v1/generate", key=KEY.key, chunks=[b'{"seed": 1}']).status == 422


def test_a_declared_oversized_body_is_413_unread():
    answer = call(gated_app(Door()), "POST", "/v1/generate", key=KEY.key, chunks=endless(), declared=LIMIT + 1)
    assert (answer.status, answer.chunks_read) == (413, 0)
    assert answer.body["field"] == "body" and f"{LIMIT + 1} bytes" in answer.body["message"]


def test_a_chunked_body_is_counted_and_refused_at_the_limit():
    answer = call(gated_app(Door()), "POST", "/v1/generate", key=KEY.key, chunks=endless())
    assert answer.status == 413 and answer.body["code"] == "too_large" and answer.body["field"] == "body"
    assert str(LIMIT) in answer.body["message"]
    assert answer.chunks_read == LIMIT // CHUNK + 1  # the chunk that crossed the limit, and not one more


def test_only_health_answers_without_a_key_and_only_to_get():
    app = gated_app(Door())
    assert call(app, "GET", "/healthz").status == 200
    assert call(app, "GET", "/healthz", root_path="/notready").status == 200  # under an app's route prefix
    for method, path, root in (("POST", "/healthz", ""), ("GET", "/healthz/", ""), ("GET", "/openapi.json", ""),
                               ("GET", "/docs", ""), ("GET", "/nothing-here", ""), ("GET", "/v1/generate", "/p")):
        assert call(app, method, path, root_path=root).status == 401, (method, path)
    with_docs = gated_app(Door(public=HEALTH_PATHS | {"/openapi.json"}))
    assert call(with_docs, "GET", "/openapi.json").status == 200
    # the limit holds on public routes too
    assert call(app, "GET", "/healthz", chunks=endless(), declared=LIMIT + 1).status == 413


def test_no_ingress_yet_is_503_and_websockets_are_closed():
    starting = call(gated_app(None), "POST", "/v1/generate", key=KEY.key, chunks=endless())
    assert (starting.status, starting.chunks_read) == (503, 0) and starting.headers["retry-after"] == "1"
    assert call(gated_app(Door()), "GET", "/v1/generate", scope_type="websocket").status == 1008


def test_the_real_api_sits_behind_the_gate():
    assert api.user_middleware[0].cls is RequestGate  # the outermost of the app's own middleware


def test_the_body_limit_defaults_from_the_image_limit():
    assert Limits().max_body_bytes == 16 * 1024**2 * 3 // 2 + 64 * 1024
    assert Limits(max_image_bytes=300_000).max_body_bytes == 450_000 + 64 * 1024
    assert Limits(max_body_bytes=5000).max_body_bytes == 5000
    # the gRPC bound holds the largest PNG a generation may answer with, whichever is larger
    small = ApiSettings(limits={"max_image_bytes": 2048, "max_side": 256})
    assert small.grpc_max_message_bytes() == 256 * 256 * 4 + 64 * 1024


@pytest.mark.parametrize(("api_section", "refused"), [
    ({}, False),  # gRPC off by default
    ({"grpc": {"enabled": True}}, True),
    ({"grpc": {"enabled": True, "port": 9100}, "http": {"host": "10.0.0.5"}}, True),
    ({"grpc": {"enabled": True, "all_interfaces": True}}, False),
    ({"grpc": {"enabled": True}, "http": {"host": "0.0.0.0"}}, False),
])
def test_grpc_listening_beyond_http_is_refused_unless_acknowledged(api_section, refused):
    if refused:
        with pytest.raises(ConfigError, match=r"every interface \(\[::\]:9\d00\).*grpc.all_interfaces: true") as caught:
            load_serving({"api": api_section})
        assert "\n" not in str(caught.value)
    else:
        load_serving({"api": api_section})


def test_serve_starts_grpc_without_reflection_and_with_the_message_bound():
    settings = ApiSettings(grpc={"enabled": True, "all_interfaces": True, "port": 9100},
                           limits={"max_image_bytes": 1_000_000})
    options = proxy_options(settings)
    assert options["grpc_options"]["port"] == 9100 and options["grpc_options"]["enable_reflection"] is False
    env = options["controller_options"]["runtime_env"]["env_vars"]
    assert env == {GRPC_MESSAGE_SIZE_VARIABLE: str(settings.grpc_max_message_bytes()),
                   **proxy_environment(settings.limits.max_body_bytes)}
    from ray.serve.config import ControllerOptions, gRPCOptions

    gRPCOptions(**options["grpc_options"])  # Serve's own models accept them
    ControllerOptions(**options["controller_options"])


def test_serve_starts_http_only_proxies_that_read_no_further_than_the_body_limit():
    settings = ApiSettings(limits={"max_body_bytes": 2_000_000})
    options = proxy_options(settings)
    assert set(options) == {"http_options", "controller_options"}
    assert options["controller_options"]["runtime_env"]["env_vars"] == proxy_environment(2_000_000)


def test_factory_serve_refuses_grpc_beyond_http_in_one_line_before_touching_ray(tmp_path):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"api": {"grpc": {"enabled": True, "port": 9100}}}))
    done = subprocess.run([sys.executable, "-m", "factory", "serve", "--config", str(config), "--address",
                           "127.0.0.1:1"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "every interface ([::]:9100), not on http.host 127.0.0.1" in line


def test_the_rayservice_starts_grpc_as_factory_serve_would():
    """KubeRay hands serveConfigV2 to Serve as it is: its gRPC proxy must get what proxy_options gives."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    repo = Path(__file__).resolve().parents[2]
    (service,) = [doc for doc in yaml.safe_load_all((repo / "infra" / "rayservice.yaml").read_text()) if doc]
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    gpu = yaml.safe_load((repo / "infra" / "serve-gpu.yaml").read_text().replace("/opt/factory/", f"{repo}/"))
    assert config.http_options.host == "0.0.0.0"  # so gRPC's [::] exposes nothing HTTP does not
    grpc = {"enabled": True, "all_interfaces": True, "port": config.grpc_options.port}
    expected = proxy_options(ApiSettings.model_validate(load_serving(gpu).config.api.model_dump() | {"grpc": grpc}))
    assert config.grpc_options.enable_reflection is False
    assert config.controller_options.runtime_env == expected["controller_options"]["runtime_env"]
