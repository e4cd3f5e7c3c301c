"""Edit rows through the batch runner a replica builds (and the CLI shares), without Ray, on the real tiny models:
references are decoded under the input pixel cap and checked by the input safety check, rows a profile cannot run
are rejected naming the field and the profile, tenant adapters style edit rows, and results record each
reference's sha256."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from factory.model.lora import create_lora_for_profile
from factory.model.lora.ref import BASE_ADAPTER, AdapterRef
from factory.model.profiles import get_profile
from factory.model.stack import ModelStack
from factory.routing.batch import ReplicaCall, adapter_key
from factory.routing.local import profile_defaults
from factory.routing.parser import parse_request
from factory.routing.replica import ReplicaConfig, build_runner
from factory.routing.requests import Status

FACE_POLICY = {"thresholds": {"FACE_FEMALE": 0.5}}


def png(path_or_image, size: tuple[int, int] | None = None) -> bytes:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image).convert("RGB")
    buffer = io.BytesIO()
    (image.resize(size) if size else image).save(buffer, format="PNG")
    return buffer.getvalue()


def edit_call(stack, row: dict, references: list[bytes] | None, adapter: str | None = None) -> ReplicaCall:
    request = parse_request({"id": "e1", "tenant": "acme", "task": "edit", "prompt": "put it on a beach",
                             "steps": 2} | row, profile_defaults(stack.profile))
    return ReplicaCall(request=request.model_copy(update={"adapter": adapter}), reference_bytes=references)


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.image_png)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def flux2(tiny_path) -> ModelStack:
    return ModelStack.from_profile("tiny-flux2")


@pytest.fixture(scope="module")
def adapters(flux2, tmp_path_factory) -> dict[str, AdapterRef]:
    folder = tmp_path_factory.mktemp("edit-adapters")
    return {
        "klein": AdapterRef(key="acme/klein", uri=str(create_lora_for_profile(folder / "klein.safetensors",
                                                                             "tiny-flux2", rank=4, seed=1))),
        "flux1": AdapterRef(key="acme/flux1", uri=str(create_lora_for_profile(folder / "flux1.safetensors", "tiny",
                                                                             rank=4, seed=1))),
    }


@pytest.fixture(scope="module")
def flux2_runner(flux2, adapters):
    return build_runner(ReplicaConfig(adapters={ref.key: ref for ref in adapters.values()},
                                      max_input_pixels=600 * 600), flux2)


@pytest.fixture(scope="module")
def tiny_runner(stack):
    return build_runner(ReplicaConfig(safety=FACE_POLICY, max_input_pixels=600 * 600), stack)


def test_an_edit_row_records_its_references_and_the_size_it_was_made_at(flux2_runner, sample_images):
    chelsea, coffee = png(sample_images["chelsea"]), png(sample_images["coffee"])
    call = edit_call(flux2_runner.stack, {"images": ["s3://b/cat.png", "s3://b/cup.png"]}, [chelsea, coffee])
    (result,) = flux2_runner.run([call])
    assert result.status is Status.OK and result.image_png, result.error
    assert result.reference_uris == ["s3://b/cat.png", "s3://b/cup.png"] and result.source_uri is None
    assert result.reference_sha256 == [hashlib.sha256(chelsea).hexdigest(), hashlib.sha256(coffee).hexdigest()]
    assert (result.width, result.height) == (304, 208) == Image.open(io.BytesIO(result.image_png)).size
    assert result.performance == "plain" and result.profile == "tiny-flux2" and result.task.value == "edit"
    # The output went through the image check: the detector's scores are on record.
    assert result.safety_verdict == "pass" and result.safety_labels is not None


def test_rows_the_profile_cannot_run_are_rejected_naming_the_field_and_the_profile(tiny_runner, sample_images):
    data = png(sample_images["coffee"])
    two = edit_call(tiny_runner.stack, {"images": ["a.png", "b.png"]}, [data, data])
    (refused,) = tiny_runner.run([two])
    assert refused.status is Status.REJECTED
    assert refused.error == "images: 2 reference images; profile tiny takes at most 1"
    assert refused.reference_sha256 == [hashlib.sha256(data).hexdigest()] * 2


def test_an_edit_on_a_profile_without_edits_is_rejected(tiny_path, sample_images):
    tiny = get_profile("tiny")
    no_edits = tiny.model_copy(update={"name": "tiny-no-edit",
                                       "generator": tiny.generator.model_copy(update={"edit": None})})
    stack = ModelStack.from_profile(no_edits)
    assert stack.generator.edit_pipe is None
    runner = build_runner(ReplicaConfig(), stack)
    (refused,) = runner.run([edit_call(stack, {"image": "a.png"}, [png(sample_images["coffee"])])])
    assert refused.status is Status.REJECTED and refused.error.startswith("task: profile tiny-no-edit cannot edit")


def test_unreadable_and_oversized_references_reject_their_row_only(flux2_runner, sample_images):
    good = png(sample_images["coffee"])
    stack = flux2_runner.stack
    calls = [
        edit_call(stack, {"id": "junk", "images": ["a.png", "b.png"]}, [good, b"not an image"]),
        edit_call(stack, {"id": "big", "image": "big.png"}, [png(sample_images["coffee"], (700, 700))]),
        edit_call(stack, {"id": "unread", "images": ["a.png", "b.png"]}, [good]),
        edit_call(stack, {"id": "ok", "image": "c.png", "width": 64, "height": 64}, [good]),
    ]
    junk, big, unread, ok = flux2_runner.run(calls)
    assert junk.status is big.status is unread.status is Status.REJECTED
    assert junk.error.startswith("images[1]: b.png: not an image")
    assert big.error.startswith("image: big.png: image too large: 700x700 pixels")
    assert unread.error == "images[1]: no bytes were read for b.png"
    assert ok.status is Status.OK and (ok.width, ok.height) == (64, 64)


def test_a_blocked_reference_blocks_its_row_before_the_generator(tiny_runner, sample_images, monkeypatch):
    edited = []
    original = tiny_runner.stack.edit
    monkeypatch.setattr(tiny_runner.stack, "edit", lambda params: edited.append(len(params)) or original(params))
    astronaut, coffee = png(sample_images["astronaut"]), png(sample_images["coffee"])
    blocked, passed = tiny_runner.run([
        edit_call(tiny_runner.stack, {"id": "face", "image": "astronaut.png"}, [astronaut]),
        edit_call(tiny_runner.stack, {"id": "cup", "image": "coffee.png", "width": 64, "height": 64}, [coffee]),
    ])
    assert blocked.status is Status.BLOCKED and blocked.image_png is None and blocked.quarantine_png is None
    assert blocked.safety_decided_by == "image_detector" and blocked.safety_verdict == "blocked"
    assert blocked.safety_reason.startswith("reference 0: image detector: FACE_FEMALE")
    assert blocked.reference_sha256 == [hashlib.sha256(astronaut).hexdigest()]
    assert passed.status is Status.OK and passed.image_png
    assert edited == [1]  # only the row whose reference passed reached the generator


def test_a_tenant_adapter_styles_edit_rows(flux2_runner, adapters, sample_images):
    reference = [png(sample_images["chelsea"])]
    row = {"image": "cat.png", "width": 64, "height": 64, "seed": 5}
    (base,) = flux2_runner.run([edit_call(flux2_runner.stack, row, reference)], BASE_ADAPTER)
    styled_call = edit_call(flux2_runner.stack, row, reference, adapter=adapters["klein"].key)
    (styled,) = flux2_runner.run([styled_call], adapter_key(styled_call.request))
    assert base.status is styled.status is Status.OK
    assert styled.adapter == "acme/klein" and styled.adapter_sha256
    assert np.abs(pixels(styled) - pixels(base)).max() > 0  # the adapter changed the edit


def test_a_flux1_adapter_is_refused_on_tiny_flux2_with_the_reason(flux2_runner, adapters, sample_images):
    call = edit_call(flux2_runner.stack, {"image": "cat.png"}, [png(sample_images["chelsea"])],
                     adapter=adapters["flux1"].key)
    (refused,) = flux2_runner.run([call], adapter_key(call.request))
    assert refused.status is Status.REJECTED and refused.image_png is None
    assert "targets transformer.single_transformer_blocks.0.attn.to_k, which this model (Flux2Transformer2DModel) " \
           "does not have (made for another base model?)" in refused.error
