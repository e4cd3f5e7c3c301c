"""The safety policy applied by the executor (what every replica runs), with the real NudeNet detector on
real photos and the real tiny stack."""

from __future__ import annotations

import pytest
from PIL import Image

from factory.routing.executor import TaskExecutor
from factory.routing.local import profile_defaults
from factory.routing.parser import parse_request
from factory.routing.requests import Status
from factory.safety.policy import SafetyChecker, SafetyPolicy

FACE_POLICY = {"thresholds": {"FACE_FEMALE": 0.5}}


def run(stack, policy: dict, rows: list[dict], sample_images=None):
    requests = [parse_request(row, profile_defaults(stack.profile)) for row in rows]
    images = [None if r.image is None else Image.open(r.image).convert("RGB") for r in requests]
    return TaskExecutor(stack, SafetyChecker(SafetyPolicy(**policy))).run(requests, images)


def caption_rows(sample_images, *names):
    return [{"id": name, "tenant": "acme", "task": "caption", "image": str(sample_images[name])} for name in names]


def test_safe_photos_pass_the_default_policy_with_scores_recorded(stack, sample_images):
    results = run(stack, {}, caption_rows(sample_images, "astronaut", "chelsea", "coffee"))
    assert [r.status for r in results] == [Status.OK] * 3
    assert all(r.safety_verdict == "pass" and r.caption for r in results)
    astronaut = results[0]
    assert "FACE_FEMALE" in astronaut.safety_labels  # recorded even though the default policy ignores it
    assert all(0 < r.safety_ms < r.latency_ms for r in results)


def test_a_face_policy_blocks_the_astronaut_with_its_score_and_no_output(stack, sample_images):
    astronaut, chelsea = run(stack, FACE_POLICY, caption_rows(sample_images, "astronaut", "chelsea"))
    assert astronaut.status is Status.BLOCKED and astronaut.caption is None
    assert astronaut.safety_verdict == "blocked" and astronaut.safety_decided_by == "image_detector"
    score = dict(zip(astronaut.safety_labels, astronaut.safety_scores))["FACE_FEMALE"]
    assert 0.5 <= score < 1 and "FACE_FEMALE" in astronaut.safety_reason
    assert astronaut.image_png is None and astronaut.quarantine_png is None
    assert chelsea.status is Status.OK and chelsea.safety_verdict == "pass"


def test_quarantine_keeps_the_flagged_input_aside_only(stack, sample_images):
    (astronaut,) = run(stack, FACE_POLICY | {"action": "quarantine"}, caption_rows(sample_images, "astronaut"))
    assert astronaut.status is Status.BLOCKED and astronaut.safety_verdict == "quarantined"
    assert astronaut.quarantine_png and astronaut.image_png is None and astronaut.caption is None


def test_flagged_inputs_may_still_be_captioned_when_the_policy_says_so(stack, sample_images):
    (astronaut,) = run(stack, FACE_POLICY | {"caption_flagged_inputs": True}, caption_rows(sample_images, "astronaut"))
    assert astronaut.status is Status.OK and astronaut.caption and astronaut.safety_verdict == "blocked"


def test_a_blocked_prompt_never_reaches_the_generator(stack):
    calls = []
    original = stack.generate

    def spy(params):
        calls.append([p.prompt for p in params])
        return original(params)

    stack.generate = spy
    try:
        results = run(stack, {"prompt_terms": ["nude"], "tenant_terms": {"beta": ["rival brand"]}}, [
            {"id": "1", "tenant": "acme", "prompt": "a ＮＵＤＥ figure", "width": 64, "height": 64, "steps": 1},
            {"id": "2", "tenant": "acme", "prompt": "a red bicycle", "width": 64, "height": 64, "steps": 1},
            {"id": "3", "tenant": "beta", "prompt": "poster for Rival  Brand shoes", "width": 64, "height": 64, "steps": 1},
            {"id": "4", "tenant": "acme", "prompt": "poster for rival brand shoes", "width": 64, "height": 64, "steps": 1},
        ])
    finally:
        del stack.generate
    assert calls == [["a red bicycle", "poster for rival brand shoes"]]
    assert [r.status for r in results] == [Status.BLOCKED, Status.OK, Status.BLOCKED, Status.OK]
    assert results[0].safety_decided_by == "prompt_filter" and results[0].image_png is None
    assert results[1].image_png and results[1].safety_verdict == "pass"


@pytest.mark.parametrize(("action", "verdict"), [("block", "blocked"), ("quarantine", "quarantined")])
def test_generated_images_flagged_by_a_transformers_classifier(stack, tmp_path, action, verdict):
    from tests.builders import save_tiny_vit

    # A classifier that calls every image "nsfw" (fixed logits): the production alternative to NudeNet,
    # loaded with from_pretrained behind the same interface.
    checkpoint = save_tiny_vit(tmp_path / "vit", bias=(0.0, 3.0))
    rows = [{"id": str(i), "tenant": "acme", "prompt": f"poster {i}", "width": 64, "height": 64, "steps": 1} for i in range(3)]
    results = run(stack, {"detector": str(checkpoint), "thresholds": {"nsfw": 0.5}, "action": action}, rows)
    assert all(r.status is Status.BLOCKED and r.safety_verdict == verdict for r in results)
    assert all(r.image_png is None for r in results)
    assert all((r.quarantine_png is not None) == (action == "quarantine") for r in results)
    assert all(r.safety_labels[0] == "nsfw" and r.safety_scores[0] > 0.9 for r in results)
