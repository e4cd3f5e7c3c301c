"""Safety layer: image detectors, the prompt filter, and the policy that turns their scores into verdicts.

Replicas use `SafetyChecker` (see `factory.safety.policy`); job specs and the Serve config carry a
`SafetyPolicy`. Nothing heavy (onnxruntime, torch, transformers) is imported until a detector loads.
"""

from factory.safety.detectors import (
    Detection,
    HFImageClassifierDetector,
    ImageDetector,
    NudeNetDetector,
    build_detector,
)
from factory.safety.policy import SafetyChecker, SafetyPolicy, SafetyVerdict
from factory.safety.prompts import PromptFilter, PromptVerdict

__all__ = [
    "Detection",
    "HFImageClassifierDetector",
    "ImageDetector",
    "NudeNetDetector",
    "PromptFilter",
    "PromptVerdict",
    "SafetyChecker",
    "SafetyPolicy",
    "SafetyVerdict",
    "build_detector",
]
