"""Safety policy (the `safety` section of job specs and of the Serve config), verdicts, and the checker.

A replica builds one `SafetyChecker` per process, calls `load()` in its setup, and then per batch:

1. `check_prompts` before generating: a blocked prompt is never sent to the generator;
2. `check_inputs` on the input images of caption/VQA rows, then `should_answer` to decide whether a
   flagged input still gets a caption or answer;
3. `check_images` on generated images before they reach a sink.

Every verdict records the detector's top labels and scores, also for images that pass, so thresholds can
be tuned later from the results table without running the detector again.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import structlog
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.errors import ConfigError
from factory.safety.detectors import NUDENET, Detection, ImageDetector, build_detector
from factory.safety.prompts import PromptFilter, PromptVerdict

log = structlog.get_logger(__name__)

# NudeNet labels for exposed sexual anatomy. Covered parts, faces, feet, belly, armpits and male chests are
# left out: acting on them would block ordinary photos of people.
NUDENET_EXPOSED_LABELS = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)
DEFAULT_THRESHOLD = 0.5


def _default_thresholds() -> dict[str, float]:
    return dict.fromkeys(NUDENET_EXPOSED_LABELS, DEFAULT_THRESHOLD)


class SafetyPolicy(BaseModel):
    """What to check and what to do about it. Defaults are meant for real use with the NudeNet detector."""

    model_config = ConfigDict(extra="forbid")

    detector: str = Field(
        default=NUDENET,
        description='"nudenet", a NudeNet-format .onnx file, or a transformers image-classification '
        "checkpoint (local folder or hub id)",
    )
    detector_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword options for the detector, e.g. {intra_op_threads: 2} for NudeNet or "
        "{device: cuda, dtype: float16} for a transformers classifier",
    )
    thresholds: dict[str, float] = Field(
        default_factory=_default_thresholds,
        description="Per detector label, the score at or above which an image is flagged; labels not "
        "listed are recorded but never acted upon. Labels must exist in the detector (checked at load)",
    )
    action: Literal["block", "quarantine"] = Field(
        default="block",
        description="What happens to a flagged image: 'block' drops it, 'quarantine' keeps it aside for "
        "review. Prompts caught by the prompt filter are always blocked",
    )
    check_inputs: bool = Field(
        default=True, description="Score the input images of caption and VQA rows with the detector"
    )
    caption_flagged_inputs: bool = Field(
        default=False,
        description="Whether an input image that was flagged still gets a caption or answer",
    )
    prompt_terms: list[str] = Field(
        default_factory=list, description="Terms that block a prompt for every tenant and locale"
    )
    tenant_terms: dict[str, list[str]] = Field(
        default_factory=dict, description="Extra blocked terms per tenant id, applied only to that tenant"
    )
    locale_terms: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Extra blocked terms per locale ("de", "fr-FR"); a request in "fr-FR" also gets the '
        '"fr" list',
    )
    top_k: int = Field(
        default=3,
        ge=0,
        description="How many of the highest-scoring detector labels to record per image (labels that "
        "caused a flag are always recorded)",
    )

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_range(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for label, value in thresholds.items():
            if not label.strip():
                raise ValueError("threshold labels must not be empty")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold for {label} must be within [0, 1], got {value}")
        return thresholds


class SafetyVerdict(BaseModel):
    """The safety decision for one row, as recorded in results."""

    model_config = ConfigDict(frozen=True)

    verdict: Literal["pass", "blocked", "quarantined"] = Field(description="What happens to the row")
    decided_by: Literal["prompt_filter", "image_detector"] | None = Field(
        default=None, description="Which check flagged the row; None when nothing did"
    )
    labels: list[str] = Field(default_factory=list, description="Top detector labels, highest score first")
    scores: list[float] = Field(default_factory=list, description="Scores of `labels`, same order")
    reason: str | None = Field(default=None, description="Why the row was flagged, for people")

    @property
    def flagged(self) -> bool:
        return self.verdict != "pass"


PASS = SafetyVerdict(verdict="pass")


class SafetyChecker:
    """A policy with its detector and prompt filter. One per replica process; safe to share across threads.

    `detector` and `prompt_filter` default to the ones the policy names; pass them to reuse loaded objects or
    to test.
    """

    def __init__(
        self,
        policy: SafetyPolicy | None = None,
        *,
        detector: ImageDetector | None = None,
        prompt_filter: PromptFilter | None = None,
    ) -> None:
        self.policy = policy or SafetyPolicy()
        self.detector = detector or build_detector(self.policy.detector, **self.policy.detector_options)
        self.prompt_filter = prompt_filter or PromptFilter(
            self.policy.prompt_terms, self.policy.tenant_terms, self.policy.locale_terms
        )
        self._ready = False
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the detector and check the policy's labels against it. Call in replica setup.

        Raises `ConfigError` when a threshold names a label the detector never emits: a typo there would
        otherwise switch that check off without a sound.
        """
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            load = getattr(self.detector, "load", None)
            if callable(load):
                load()
            known = getattr(self.detector, "labels", None)
            if known is not None:
                unknown = sorted(set(self.policy.thresholds) - set(known))
                if unknown:
                    raise ConfigError(
                        f"safety thresholds name labels that detector {self.policy.detector!r} does not "
                        f"emit: {', '.join(unknown)} (it emits: {', '.join(known)})"
                    )
            if not self.policy.thresholds:
                log.warning("safety.policy.no_thresholds", detector=self.policy.detector)
            self._ready = True

    def check_prompts(
        self,
        prompts: Sequence[str | None],
        tenants: Sequence[str | None] | None = None,
        locales: Sequence[str | None] | None = None,
    ) -> list[SafetyVerdict]:
        """One verdict per prompt (None passes). Blocked prompts are always 'blocked', whatever the action."""
        return [self._prompt_verdict(v) for v in self.prompt_filter.check_many(prompts, tenants, locales)]

    def check_images(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        """One verdict per generated image, from a single batched detector call."""
        if not images:
            return []
        self.load()
        detections = self.detector.detect(list(images))
        if len(detections) != len(images):
            raise RuntimeError(f"detector returned {len(detections)} results for {len(images)} images")
        verdicts = [self._image_verdict(found) for found in detections]
        flagged = sum(verdict.flagged for verdict in verdicts)
        if flagged:
            log.debug("safety.images.flagged", flagged=flagged, checked=len(images))
        return verdicts

    def check_inputs(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        """Like `check_images`, for input images of caption/VQA rows; all pass if the policy skips inputs."""
        if not self.policy.check_inputs:
            return [PASS] * len(images)
        return self.check_images(images)

    def should_answer(self, input_verdict: SafetyVerdict) -> bool:
        """Whether a caption/VQA row whose input got `input_verdict` should still run the VLM."""
        return not input_verdict.flagged or self.policy.caption_flagged_inputs

    @staticmethod
    def _prompt_verdict(verdict: PromptVerdict) -> SafetyVerdict:
        if not verdict.blocked:
            return PASS
        return SafetyVerdict(verdict="blocked", decided_by="prompt_filter", reason=verdict.reason)

    def _image_verdict(self, detections: Sequence[Detection]) -> SafetyVerdict:
        ranked = sorted(detections, key=lambda found: found.score, reverse=True)
        thresholds = self.policy.thresholds
        tripped = [
            found for found in ranked if found.label in thresholds and found.score >= thresholds[found.label]
        ]
        recorded = ranked[: self.policy.top_k]
        # The labels behind a decision are always on record, even when they are not among the top k.
        recorded += [found for found in tripped if found not in recorded]
        recorded.sort(key=lambda found: found.score, reverse=True)
        labels = [found.label for found in recorded]
        scores = [found.score for found in recorded]
        if not tripped:
            return SafetyVerdict(verdict="pass", labels=labels, scores=scores)
        reason = "image detector: " + "; ".join(
            f"{found.label} {found.score:.3g} >= {thresholds[found.label]:g}" for found in tripped
        )
        return SafetyVerdict(
            verdict="blocked" if self.policy.action == "block" else "quarantined",
            decided_by="image_detector",
            labels=labels,
            scores=scores,
            reason=reason,
        )
