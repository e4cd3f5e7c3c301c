"""The batch runner that the Serve replicas and the CLI share, built the way a replica builds it, without Ray."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from factory.model.lora import create_lora
from factory.model.lora.ref import BASE_ADAPTER, AdapterRef
from factory.model.lora.safe_load import loaded_adapter_names
from factory.model.stack import ModelStack
from factory.routing.batch import ReplicaCall, adapter_key
from factory.routing.parser import GenerationDefaults, parse_request
from factory.routing.replica import ReplicaConfig, build_runner
from factory.routing.requests import Status

DEFAULTS = GenerationDefaults(steps=2, width=64, height=64, guidance=3.5)


def call(row: dict, image_bytes: bytes | None = None, adapter: str | None = None) -> ReplicaCall:
    request = parse_request({"tenant": "acme"} | row, DEFAULTS).model_copy(update={"adapter": adapter})
    return ReplicaCall(request=request, image_bytes=image_bytes)


def png_bytes(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runner(stack):
    return build_runner(ReplicaConfig(max_input_pixels=64 * 64), stack)


def test_a_bad_input_rejects_its_row_only(runner):
    calls = [
        call({"id": "ok", "task": "caption", "image": "a.png"}, png_bytes()),
        call({"id": "junk", "task": "caption", "image": "b.png"}, b"not an image"),
        call({"id": "bomb", "task": "caption", "image": "c.png"}, png_bytes((100, 100))),
        call({"id": "unread", "task": "caption", "image": "d.png"}),
        call({"id": "gen", "prompt": "a red bicycle"}),
    ]
    ok, junk, bomb, unread, gen = runner.run(calls, BASE_ADAPTER)
    assert ok.status is Status.OK and ok.caption and gen.status is Status.OK and gen.image_png
    assert junk.status is bomb.status is unread.status is Status.REJECTED
    assert junk.error.startswith("image: b.png: not an image")
    assert bomb.error.startswith("image: c.png: image too large: 100x100 pixels")
    assert unread.error == "image: no bytes were read for d.png"
    assert gen.adapter is None and gen.adapter_sha256 is None


def test_an_adapter_outside_the_registry_refuses_the_batch(runner):
    calls = [call({"id": "a", "prompt": "x"}, adapter="acme/nope")]
    (refused,) = runner.run(calls, adapter_key(calls[0].request))
    assert refused.status is Status.REJECTED
    assert refused.error == "adapter acme/nope: not in this deployment's tenants registry"


def test_a_replica_config_with_a_hotswap_rank_runs_adapters_by_hotswap(tiny_path, tmp_path):
    stack = ModelStack.from_profile("tiny")  # its own pipeline: hot-swap must precede the first adapter load
    path = create_lora(tmp_path / "brand.safetensors", transformer=stack.generator.pipe.transformer, rank=4, seed=1)
    ref = AdapterRef(key="acme/brand", uri=str(path))
    runner = build_runner(ReplicaConfig(adapters={ref.key: ref}, max_adapters=1, lora_hotswap_rank=8), stack)
    assert runner.pool.stats()["hotswap"] and runner.pool.hotswap_rank == 8

    styled = call({"id": "r1", "prompt": "a red bicycle", "seed": 3}, adapter=ref.key)
    base = call({"id": "r1", "prompt": "a red bicycle", "seed": 3})
    (with_adapter,) = runner.run([styled], adapter_key(styled.request))
    (without,) = runner.run([base], adapter_key(base.request))

    assert with_adapter.status is without.status is Status.OK
    assert with_adapter.adapter == "acme/brand"
    assert with_adapter.adapter_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert with_adapter.image_png != without.image_png and without.adapter is None
    assert loaded_adapter_names(stack.generator.pipe) == {"slot0"}  # a hot-swap slot, not the adapter's name
    assert runner.pool.stats()["loads"] == 1
