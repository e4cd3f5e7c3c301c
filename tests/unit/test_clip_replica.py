"""CLIPScore in the replica: the profile's CLIP model loaded once beside the stack when a job scores, every ok
generated or edited image scored against its prompt in its batch's call, nothing loaded or scored otherwise.
Built the way a replica builds its runner, with the real tiny models, without Ray."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from PIL import Image

from factory.errors import ConfigError, ModelError
from factory.model.clip import ClipScorer, clip_version, pin_clip
from factory.model.profiles import PROFILES
from factory.model.stack import ModelStack
from factory.routing.app import FleetSizing, replica_fingerprint, replica_setup
from factory.routing.batch import ReplicaCall
from factory.routing.health import HealthProbe
from factory.routing.local import profile_defaults
from factory.routing.parser import parse_request
from factory.routing.replica import ReplicaConfig, build_runner
from factory.routing.requests import Status
from factory.safety.policy import SafetyPolicy

SMALL = {"width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def scorer(tiny_path):
    return ClipScorer.from_profile(PROFILES["tiny"].quality.clip)


@pytest.fixture(scope="module")
def scoring_runner(stack, scorer):
    # The session's stack with a CLIP model beside it, as `from_profile(clip_score=True)` builds it (tested below).
    config = ReplicaConfig(clip_score=True, safety=SafetyPolicy(prompt_terms=["forbidden"]))
    return build_runner(config, dataclasses.replace(stack, clip=scorer))


def _calls(stack, rows: list[dict], images: dict[str, bytes] | None = None) -> list[ReplicaCall]:
    requests = [parse_request({"tenant": "acme"} | row, profile_defaults(stack.profile)) for row in rows]
    return [ReplicaCall(request=request, image_bytes=(images or {}).get(request.id)) for request in requests]


def _png(path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ok_images_are_scored_against_their_prompts_in_the_batch(scoring_runner, scorer, sample_images):
    coffee = _png(sample_images["coffee"])
    rows = [
        {"id": "g1", "prompt": "a red bicycle", "seed": 1, **SMALL},
        {"id": "g2", "prompt": "a forbidden poster", "seed": 2, **SMALL},
        {"id": "g3", "prompt": "a cup of coffee on a table", "seed": 3, **SMALL},
        {"id": "c1", "task": "caption", "image": "coffee.png", "references": ["a cup of coffee"]},
        {"id": "e1", "prompt": "Edit: make it blue", "image": "coffee.png", "seed": 4, **SMALL},
    ]
    calls = {
        "base": _calls(scoring_runner.stack, rows[:4], {"c1": coffee}),
        "edit": [ReplicaCall(request=_calls(scoring_runner.stack, rows[4:])[0].request, reference_bytes=[coffee])],
    }
    g1, g2, g3, c1 = scoring_runner.run(calls["base"])
    (e1,) = scoring_runner.run(calls["edit"])

    assert [r.status for r in (g1, g2, g3, c1, e1)] == [Status.OK, Status.BLOCKED, Status.OK, Status.OK, Status.OK]
    made = {r.id: Image.open(io.BytesIO(r.image_png)) for r in (g1, g3, e1)}
    expected = scorer.score(list(made.values()), ["a red bicycle", "a cup of coffee on a table", "make it blue"])
    assert [g1.clip_score, g3.clip_score, e1.clip_score] == pytest.approx(expected, abs=1e-4)
    assert all(0 <= score <= 100 for score in expected)
    # A blocked image is scored by no model; a caption has no image of its own to score.
    assert g2.clip_score is None and c1.clip_score is None and c1.quality_ms is None
    assert c1.references == ["a cup of coffee"]
    for result in (g1, g2, g3, e1):
        assert 0 < result.quality_ms <= result.latency_ms


def test_a_stack_without_clip_scores_nothing(stack):
    assert stack.clip is None
    runner = build_runner(ReplicaConfig(), stack)
    (result,) = runner.run(_calls(stack, [{"id": "g", "prompt": "a red bicycle", **SMALL}]))
    assert result.status is Status.OK and result.clip_score is None and result.quality_ms is None
    with pytest.raises(ModelError, match="without a CLIP model"):
        stack.clip_score([], [])


def test_from_profile_loads_the_profiles_clip_once_beside_the_models(tiny_path, monkeypatch):
    loads = []
    original = ClipScorer.from_pretrained.__func__

    def counted(cls, source, profile):
        loads.append(source)
        return original(cls, source, profile)

    monkeypatch.setattr(ClipScorer, "from_pretrained", classmethod(counted))
    scoring = ModelStack.from_profile("tiny", clip_score=True)
    assert loads == [str(tiny_path / "clip")]
    assert isinstance(scoring.clip, ClipScorer) and scoring.clip.model.dtype is torch.float32
    assert ModelStack.from_profile("tiny").clip is None and len(loads) == 1


def test_scoring_with_a_profile_that_names_no_clip_model_is_one_line(monkeypatch):
    unscored = PROFILES["tiny"].model_copy(update={"name": "unscored", "quality": None})
    monkeypatch.setitem(PROFILES, "unscored", unscored)
    message = r"^quality\.clip_score: profile 'unscored' names no CLIP model to score with \(its quality\.clip\)"
    with pytest.raises(ConfigError, match=message):
        replica_setup("unscored", FleetSizing(), SafetyPolicy(), None, None, clip_score=True)
    with pytest.raises(ConfigError, match=message):
        ModelStack.from_profile(unscored, clip_score=True)
    replica_setup("unscored", FleetSizing(), SafetyPolicy(), None, None)  # not scoring: nothing to refuse


def test_scoring_is_part_of_the_replica_fingerprint():
    def fingerprint(**quality):
        return replica_fingerprint(*replica_setup("tiny", FleetSizing(), SafetyPolicy(), None, None, **quality))

    plain, scoring = fingerprint(), fingerprint(clip_score=True)
    assert plain != scoring
    assert fingerprint(clip_revision="0" * 40) == plain  # a commit for a CLIP model that is not loaded: no change
    config, _ = replica_setup("tiny", FleetSizing(), SafetyPolicy(), None, None, clip_score=True, clip_revision="a")
    assert (config.clip_score, config.clip_revision) == (True, "a")


def test_clip_models_are_pinned_and_named_as_quality_json_records_them():
    tiny = PROFILES["tiny"].quality.clip
    assert pin_clip(tiny) is tiny and clip_version(tiny).startswith("tiny-v")
    hub = PROFILES["flux-dev"].quality.clip
    pinned = pin_clip(hub, "f" * 40)
    assert pinned.revision == "f" * 40 and clip_version(pinned) == f"openai/clip-vit-large-patch14@{'f' * 40}"


def test_the_health_check_runs_the_clip_model(scoring_runner):
    probe = HealthProbe(scoring_runner, cache_s=0.0)
    probe.check()
    weight = scoring_runner.stack.clip.model.visual_projection.weight
    saved = weight.data.clone()
    weight.data.fill_(float("nan"))
    try:
        with pytest.raises(ModelError, match="health check: clip returned 1 NaN"):
            probe.check()
    finally:
        weight.data.copy_(saved)
