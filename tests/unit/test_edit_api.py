"""The online API's edit door without Ray: `POST /v1/edit` and gRPC `Edit` bodies, references read and checked
as input images are, the profile's capabilities checked before anything is read, and the output's size."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from factory.routing.api import ApiIngress
from factory.routing.api_models import ApiError, EditBody, TaskBody
from factory.routing.grpc_service import body_from_message, response_message
from factory.routing.proto import factory_api_pb2 as pb
from factory.routing.requests import Task

DEFAULTS = {"steps": 2, "width": 64, "height": 64, "guidance": 3.5, "edit_guidance": 2.5}


def png(size=(48, 32), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ingress(profile: str = "tiny", **api):
    """The ingress class itself (Serve's `ingress` wraps it in an ASGI class whose constructor is async)."""
    plain = next(cls for cls in ApiIngress.__mro__[1:] if cls.__name__ == "ApiIngress")
    limits = {"max_side": 256, "max_image_bytes": 200_000} | api.pop("limits", {})
    return plain(None, {"api": {"limits": limits, **api}, "defaults": DEFAULTS, "profile": profile})


def refused(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        result = call()
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return caught.value


def test_edit_bodies_take_one_reference_or_several():
    one = EditBody.model_validate({"prompt": "on a beach", "image_base64": b64(png())})
    several = EditBody.model_validate({"prompt": "on a beach", "images": [{"image_uri": "s3://b/a.png"},
                                                                         {"image_base64": b64(png())}]})
    assert one.images is None and [r.image_uri for r in several.images] == ["s3://b/a.png", None]
    for bad in ({"image_base64": "x"}, {"prompt": "p", "images": []},
                {"prompt": "p", "images": [{"image_uri": "s3://b/a", "image_base64": "aGk="}]},
                {"prompt": "p", "images": [{"path": "/etc/passwd"}]}, {"prompt": "p", "question": "?"}):
        with pytest.raises(ValidationError):
            EditBody.model_validate(bad)


def test_a_body_becomes_the_same_edit_request_as_a_manifest_row():
    door = ingress()
    request = door.request_of("acme", EditBody(prompt="on a beach", image_base64=b64(png()), seed=3), None)
    assert request.task is Task.EDIT and request.images == ("upload",) and request.image is None
    assert (request.prompt, request.seed, request.guidance, request.steps) == ("on a beach", 3, 2.5, 2)
    routed = door.request_of("acme", TaskBody(prompt="Edit: on a beach", image_uri="s3://b/k.png"), None)
    assert routed.task is Task.EDIT and routed.images == ("s3://b/k.png",)
    several = ingress("tiny-flux2").request_of("acme", TaskBody(task="edit", prompt="x", images=[
        {"image_uri": "s3://b/1.png"}, {"image_base64": "aGk="}]), None)
    assert several.images == ("s3://b/1.png", "upload:1")


def test_what_the_profile_cannot_run_is_400_naming_the_field_before_any_read():
    body = EditBody(prompt="x", images=[{"image_uri": "s3://b/1.png"}, {"image_uri": "s3://b/2.png"}])
    error = refused(lambda: ingress("tiny").request_of("acme", body, None))  # Kontext takes one reference
    assert (error.status, error.field) == (400, "images") and "profile tiny takes at most 1" in error.message
    assert ingress("tiny-flux2").request_of("acme", body, None).images == ("s3://b/1.png", "s3://b/2.png")
    error = refused(lambda: ingress("flux-schnell").request_of("acme", EditBody(prompt="x", image_uri="s3://b/1"),
                                                               None))
    assert (error.status, error.field) == (400, "task") and "profile flux-schnell cannot edit" in error.message
    # the server's limits hold for edits as for generations
    error = refused(lambda: ingress(limits={"max_steps": 3}).request_of(
        "acme", EditBody(prompt="x", image_uri="s3://b/1", steps=4), None))
    assert (error.status, error.field) == (400, "steps")
    error = refused(lambda: ingress("tiny").request_of("acme", EditBody(prompt="x"), None))
    assert (error.status, error.field) == (400, "image")


def test_each_reference_is_read_and_checked_as_an_input_image():
    door = ingress("tiny-flux2")
    body = EditBody(prompt="x", images=[{"image_base64": b64(png((40, 20)))}, {"image_base64": b64(png())}])
    request = door.request_of("acme", body, None)
    read = asyncio.run(door.reference_images(request, body, None, None))
    assert [size for _, size in read] == [(40, 20), (48, 32)] and read[1][0] == png()
    # over gRPC the bytes travel raw, aligned with `images`
    raw = asyncio.run(door.reference_images(request, body, None, [png((16, 16)), None]))
    assert [size for _, size in raw] == [(16, 16), (48, 32)]
    for references, status, field in (
        ([{"image_base64": b64(png())}, {"image_base64": b64(b"not an image")}], 400, "images[1]"),
        ([{"image_base64": b64(png())}, {"image_base64": b64(b"\0" * 200_001)}], 413, "images[1]"),
        ([{}, {"image_base64": b64(png())}], 400, "images[0]"),
        ([{"image_uri": "/etc/passwd"}], 400, "images[0]"),
        ([{"image_uri": "s3://other-bucket/acme/x.png"}], 403, "images[0]"),  # no input roots: nothing is read
    ):
        bad = EditBody(prompt="x", images=references)
        error = refused(lambda: door.reference_images(door.request_of("acme", bad, None), bad, None, None))
        assert (error.status, error.field) == (status, field), error.message
    bomb = io.BytesIO()
    Image.new("1", (9000, 5000)).save(bomb, "PNG")
    single = EditBody(prompt="x", image_base64=b64(bomb.getvalue()))
    error = refused(lambda: door.reference_images(door.request_of("acme", single, None), single, None, None))
    assert (error.status, error.field) == (413, "image_base64")


def test_an_edit_without_a_size_keeps_the_first_references_aspect_within_the_servers_limits():
    door = ingress(limits={"max_side": 64})
    request = door.request_of("acme", EditBody(prompt="x", image_base64=b64(png((400, 100)))), None)
    sized = door.sized_edit(request, (b"", (400, 100)))
    assert (sized.width, sized.height) == (64, 16)  # 4:1 within 64x64 pixels and a side of at most 64
    given = door.request_of("acme", EditBody(prompt="x", image_base64="aGk=", width=32, height=48), None)
    assert door.sized_edit(given, (b"", (400, 100))) is given


def test_grpc_references_and_the_response_carry_the_same_fields():
    message = pb.TaskRequest(prompt="x", images=[pb.Reference(image=b"\x89PNG"), pb.Reference(image_uri="s3://b/k")])
    fields, image, references = body_from_message(message)
    assert fields == {"prompt": "x", "images": [{}, {"image_uri": "s3://b/k"}]} and image is None
    assert references == [b"\x89PNG", None]
    assert EditBody.model_validate(fields).images[1].image_uri == "s3://b/k"
    assert body_from_message(pb.TaskRequest(prompt="x"))[2] is None
    from factory.routing.api_models import TaskResponse

    response = TaskResponse(id="a", tenant="t", task="edit", status="ok", reference_sha256=["ab" * 32])
    assert list(response_message(response).reference_sha256) == ["ab" * 32]
