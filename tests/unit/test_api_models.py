"""The API's bodies, error mapping and gRPC conversion, without Ray."""

from __future__ import annotations

import base64
import io

import grpc
import pytest
from PIL import Image
from pydantic import ValidationError

from factory.routing.api import ApiError, _b64decode, check_image_header, problems_error
from factory.routing.api_models import AnswerBody, CaptionBody, GenerateBody, TaskBody, TaskResponse
from factory.routing.grpc_service import body_from_message, grpc_code, response_message
from factory.routing.proto import factory_api_pb2 as pb


def first_problem(model, data) -> ApiError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return problems_error(caught.value)


@pytest.mark.parametrize(("model", "data", "field"), [
    (GenerateBody, {"prompt": "x", "colour": "red"}, "colour"),
    (GenerateBody, {"prompt": "x", "width": 100}, "width"),
    (GenerateBody, {}, "prompt"),
    (GenerateBody, {"prompt": "x", "adapter": "../etc"}, "adapter"),
    (GenerateBody, {"prompt": "x", "adapter": "a/b/c"}, "adapter"),
    (GenerateBody, {"prompt": "x", "output": "s3"}, "output"),
    (GenerateBody, {"prompt": "x", "id": "a\nb"}, "id"),
    (CaptionBody, {"image_base64": "***"}, "image_base64"),
    (CaptionBody, {"image_base64": "aGk=", "image_uri": "s3://b/k"}, "body"),
    (AnswerBody, {"image_base64": "aGk="}, "question"),
    (TaskBody, {"steps": 0}, "steps"),
])
def test_shape_problems_are_422_naming_the_field(model, data, field):
    error = first_problem(model, data)
    assert error.status == 422 and error.field == field and error.message


def test_bodies_accept_what_users_send():
    assert GenerateBody.model_validate({"prompt": " a cat ", "adapter": "acme/brand"}).prompt == "a cat"
    assert TaskBody.model_validate({"prompt": "Question: why?", "image_uri": "s3://bucket/k.png"}).task is None
    assert CaptionBody.model_validate({"image_base64": "aGk-_w"}).image_base64 == "aGk-_w"  # URL-safe


def test_base64_size_is_judged_before_decoding():
    assert _b64decode(base64.urlsafe_b64encode(b"\xfb\xff hi").decode().rstrip("="), 100) == b"\xfb\xff hi"
    with pytest.raises(ApiError) as caught:
        _b64decode("A" * 4000, 1000)
    assert caught.value.status == 413
    with pytest.raises(ApiError) as caught:
        _b64decode("abcde", 1000)
    assert caught.value.status == 400


def test_image_headers_are_checked_without_decoding_pixels():
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, "PNG")
    with pytest.raises(ApiError) as caught:
        check_image_header(buffer.getvalue(), "image_base64", 1_000_000)
    assert caught.value.status == 413 and "5000x5000" in caught.value.message
    with pytest.raises(ApiError) as caught:
        check_image_header(b"GIF89a-nope", "image", 10)
    assert caught.value.status == 400
    small = io.BytesIO()
    Image.new("RGB", (4, 4)).save(small, "JPEG")
    check_image_header(small.getvalue(), "image", 100)


def test_grpc_messages_become_the_same_bodies():
    fields, image, _ = body_from_message(pb.TaskRequest(prompt="a cat", seed=0, guidance=3.5, image=b"\x89PNG"))
    assert fields == {"prompt": "a cat", "seed": 0, "guidance": 3.5} and image == b"\x89PNG"
    assert GenerateBody.model_validate(fields).seed == 0  # proto3 presence: an explicit 0 is kept
    response = TaskResponse(id="a", tenant="t", task="generate", status="ok",
                            image_base64=base64.b64encode(b"png").decode(), seed=7)
    message = response_message(response)
    assert message.image == b"png" and message.seed == 7 and not message.HasField("caption")
    assert grpc_code(404) == grpc.StatusCode.NOT_FOUND and grpc_code(503) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(500) == grpc.StatusCode.INTERNAL
