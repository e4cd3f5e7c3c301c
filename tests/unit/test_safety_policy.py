"""Policy, verdicts and the checker, with the real NudeNet detector on real photos and a scripted fake."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from PIL import Image
from pydantic import ValidationError
from skimage import data

from factory.errors import ConfigError
from factory.safety.detectors import Detection, NudeNetDetector
from factory.safety.policy import NUDENET_EXPOSED_LABELS, SafetyChecker, SafetyPolicy, SafetyVerdict

SAFE_PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "horse", "immunohistochemistry")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)())


class ScriptedDetector:
    """Returns fixed detections per image (keyed by image width) and counts calls."""

    labels = ("A", "B", "C", "D", "E")

    def __init__(self, by_width: dict[int, list[Detection]]) -> None:
        self.by_width = by_width
        self.calls = 0

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        self.calls += 1
        return [self.by_width[image.width] for image in images]


def blank(width: int) -> Image.Image:
    return Image.new("RGB", (width, 8))


@pytest.fixture(scope="module")
def nudenet() -> NudeNetDetector:
    detector = NudeNetDetector()
    detector.load()
    return detector


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: photo(name) for name in SAFE_PHOTOS}


# --- policy model ----------------------------------------------------------------------------------


def test_default_policy_blocks_exposed_anatomy_with_nudenet(nudenet: NudeNetDetector) -> None:
    policy = SafetyPolicy()
    assert policy.detector == "nudenet"
    assert policy.action == "block"
    assert policy.check_inputs and not policy.caption_flagged_inputs
    assert policy.top_k == 3
    assert policy.thresholds == dict.fromkeys(NUDENET_EXPOSED_LABELS, 0.5)
    assert "FEMALE_BREAST_EXPOSED" in policy.thresholds and "FACE_FEMALE" not in policy.thresholds
    assert set(policy.thresholds) <= set(nudenet.labels)  # every default label is one the model emits


def test_every_policy_field_is_described() -> None:
    for model in (SafetyPolicy, SafetyVerdict):
        undocumented = [name for name, field in model.model_fields.items() if not field.description]
        assert undocumented == [], model.__name__


def test_policy_validates_like_a_config_section() -> None:
    policy = SafetyPolicy.model_validate(
        {"thresholds": {"FACE_FEMALE": 0.5}, "action": "quarantine", "locale_terms": {"de": ["nackt"]}}
    )
    assert policy.action == "quarantine" and policy.thresholds == {"FACE_FEMALE": 0.5}
    for bad in ({"treshold": {}}, {"thresholds": {"X": 1.5}}, {"action": "delete"}, {"top_k": -1}):
        with pytest.raises(ValidationError):
            SafetyPolicy.model_validate(bad)


# --- real detector ---------------------------------------------------------------------------------


def test_default_policy_passes_safe_photos(nudenet: NudeNetDetector, photos: dict[str, Image.Image]) -> None:
    checker = SafetyChecker(detector=nudenet)
    verdicts = checker.check_images(list(photos.values()))
    assert [verdict.verdict for verdict in verdicts] == ["pass"] * len(photos)
    assert all(verdict.decided_by is None and verdict.reason is None for verdict in verdicts)
    # Scores are recorded for passing images too.
    astronaut = verdicts[0]
    assert astronaut.labels == ["FACE_FEMALE"] and astronaut.scores[0] == pytest.approx(0.72, abs=0.02)


def test_a_face_policy_blocks_the_astronaut_only(nudenet: NudeNetDetector, photos: dict[str, Image.Image]) -> None:
    checker = SafetyChecker(SafetyPolicy(thresholds={"FACE_FEMALE": 0.5}), detector=nudenet)
    astronaut, chelsea, coffee = checker.check_images([photos["astronaut"], photos["chelsea"], photos["coffee"]])
    assert astronaut.verdict == "blocked" and astronaut.flagged
    assert astronaut.decided_by == "image_detector"
    assert astronaut.labels == ["FACE_FEMALE"]
    assert astronaut.scores[0] == pytest.approx(0.72, abs=0.02)
    assert astronaut.reason == f"image detector: FACE_FEMALE {astronaut.scores[0]:.3g} >= 0.5"
    assert chelsea == coffee == SafetyVerdict(verdict="pass")


def test_quarantine_action_and_inputs(nudenet: NudeNetDetector, photos: dict[str, Image.Image]) -> None:
    policy = SafetyPolicy(thresholds={"FACE_FEMALE": 0.5}, action="quarantine")
    checker = SafetyChecker(policy, detector=nudenet)
    images = [photos["astronaut"], photos["chelsea"]]
    outputs = checker.check_images(images)
    assert [verdict.verdict for verdict in outputs] == ["quarantined", "pass"]
    inputs = checker.check_inputs(images)
    assert inputs == outputs
    assert not checker.should_answer(inputs[0]) and checker.should_answer(inputs[1])
    lenient = SafetyChecker(policy.model_copy(update={"caption_flagged_inputs": True}), detector=nudenet)
    assert lenient.should_answer(inputs[0])


def test_batch_verdicts_equal_single_verdicts(nudenet: NudeNetDetector, photos: dict[str, Image.Image]) -> None:
    checker = SafetyChecker(SafetyPolicy(thresholds={"FACE_FEMALE": 0.5, "FACE_MALE": 0.5}), detector=nudenet)
    images = list(photos.values())
    batch = checker.check_images(images)
    single = [checker.check_images([image])[0] for image in images]
    assert [v.verdict for v in batch] == [v.verdict for v in single]
    assert sum(v.flagged for v in batch) == 2  # astronaut and the cameraman
    for one, other in zip(batch, single, strict=True):
        assert one.labels == other.labels and one.reason == other.reason
        assert one.scores == pytest.approx(other.scores, abs=1e-4)


def test_checker_built_from_policy_alone_uses_nudenet() -> None:
    checker = SafetyChecker(SafetyPolicy(thresholds={"FACE_FEMALE": 0.5}, detector_options={"max_batch": 2}))
    assert isinstance(checker.detector, NudeNetDetector) and checker.detector.max_batch == 2
    assert [v.verdict for v in checker.check_images([photo("astronaut"), photo("coffee")])] == ["blocked", "pass"]


def test_unknown_threshold_labels_fail_at_load(nudenet: NudeNetDetector) -> None:
    checker = SafetyChecker(SafetyPolicy(thresholds={"FEMALE_BREAST_EXPOSD": 0.5}), detector=nudenet)
    with pytest.raises(ConfigError, match="FEMALE_BREAST_EXPOSD"):
        checker.load()
    # Checking without an explicit load() must not skip the validation.
    checker = SafetyChecker(SafetyPolicy(thresholds={"FEMALE_BREAST_EXPOSD": 0.5}), detector=nudenet)
    with pytest.raises(ConfigError):
        checker.check_images([photo("chelsea")])


# --- verdict rules, with a scripted detector --------------------------------------------------------


def test_top_k_keeps_the_highest_and_always_the_deciding_labels() -> None:
    scored = [("A", 0.9), ("B", 0.8), ("C", 0.7), ("D", 0.6)]
    found = [Detection(label=label, score=score) for label, score in scored]
    detector = ScriptedDetector({10: found, 20: [Detection(label="E", score=0.5)], 30: []})
    checker = SafetyChecker(SafetyPolicy(thresholds={"D": 0.6, "E": 0.5}, top_k=2), detector=detector)
    first, second, third = checker.check_images([blank(10), blank(20), blank(30)])
    assert detector.calls == 1  # one batched call
    assert first.labels == ["A", "B", "D"] and first.scores == [0.9, 0.8, 0.6]
    assert first.reason == "image detector: D 0.6 >= 0.6"  # threshold is inclusive
    assert second.verdict == "blocked" and second.labels == ["E"]
    assert third == SafetyVerdict(verdict="pass")
    none_recorded = SafetyChecker(SafetyPolicy(thresholds={"D": 0.65}, top_k=0), detector=detector)
    assert none_recorded.check_images([blank(10)])[0] == SafetyVerdict(verdict="pass")


def test_inputs_are_not_scored_when_the_policy_says_so() -> None:
    detector = ScriptedDetector({10: [Detection(label="A", score=1.0)]})
    checker = SafetyChecker(SafetyPolicy(thresholds={"A": 0.5}, check_inputs=False), detector=detector)
    assert checker.check_inputs([blank(10), blank(10)]) == [SafetyVerdict(verdict="pass")] * 2
    assert detector.calls == 0
    assert checker.check_images([blank(10)])[0].verdict == "blocked"  # outputs are still checked
    assert checker.check_images([]) == [] and detector.calls == 1


def test_a_detector_that_loses_images_is_an_error() -> None:
    class Lossy(ScriptedDetector):
        def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
            return super().detect(images)[:1]

    checker = SafetyChecker(SafetyPolicy(thresholds={}), detector=Lossy({10: []}))
    with pytest.raises(RuntimeError, match="1 results for 2 images"):
        checker.check_images([blank(10), blank(10)])


# --- prompts through the checker ------------------------------------------------------------------


def test_blocked_prompts_are_blocked_whatever_the_action() -> None:
    policy = SafetyPolicy(
        action="quarantine",
        prompt_terms=["nude"],
        tenant_terms={"acme": ["rival"]},
        locale_terms={"de": ["nackt"]},
    )
    checker = SafetyChecker(policy, detector=ScriptedDetector({}))
    verdicts = checker.check_prompts(
        ["NÜDE beach", "the rival", "the rival", "nackt", None],
        tenants=[None, "acme", "globex", None, "acme"],
        locales=[None, None, None, "de-DE", None],
    )
    assert [v.verdict for v in verdicts] == ["blocked", "blocked", "pass", "blocked", "pass"]
    assert {v.decided_by for v in verdicts if v.flagged} == {"prompt_filter"}
    assert "'nude' on global list" in str(verdicts[0].reason)
    assert "tenant:acme" in str(verdicts[1].reason)
