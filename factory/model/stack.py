"""The multi-task stack: one object per process holding the generator and the VLM of one profile."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from PIL import Image

from factory.errors import ModelError
from factory.model.generator import FluxGenerator, GenerationParams
from factory.logs import quiet_library_noise
from factory.model.profiles import TINY_SOURCE, Profile, get_profile
from factory.paths import factory_home
from factory.model.tiny import BUILDER_VERSION, ensure_tiny
from factory.model.vlm import VisionLanguageModel

log = structlog.get_logger(__name__)


@dataclass
class ModelStack:
    profile: Profile
    generator: FluxGenerator
    vlm: VisionLanguageModel
    model_version: str
    load_seconds: float = field(default=0.0)

    @classmethod
    def from_profile(cls, profile: Profile | str, home: Path | None = None) -> ModelStack:
        profile = get_profile(profile) if isinstance(profile, str) else profile
        quiet_library_noise()
        started = time.perf_counter()
        generator_source, vlm_source, version = resolve_sources(profile, home)
        try:
            generator = FluxGenerator.from_pretrained(generator_source, profile.generator)
            vlm = VisionLanguageModel.from_pretrained(vlm_source, profile.vlm)
        except (OSError, ValueError) as error:
            raise ModelError(f"profile {profile.name}: cannot load models: {error}") from error
        seconds = time.perf_counter() - started
        log.info("stack loaded", profile=profile.name, seconds=round(seconds, 2))
        return cls(profile, generator, vlm, version, seconds)

    def generate(self, params: list[GenerationParams]) -> list[Image.Image]:
        return self.generator.generate(params)

    def caption(self, images: list[Image.Image], instructions: list[str | None] | None = None) -> list[str]:
        return self.vlm.caption(images, instructions)

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        return self.vlm.answer(images, questions)


def resolve_sources(profile: Profile, home: Path | None = None) -> tuple[str, str, str]:
    """Where each component loads from, and a version string recorded with every result."""
    generator_source, vlm_source = profile.generator.source, profile.vlm.source
    if TINY_SOURCE in (generator_source, vlm_source):
        built = ensure_tiny(home or factory_home())
        if generator_source == TINY_SOURCE:
            generator_source = str(built / "flux")
        if vlm_source == TINY_SOURCE:
            vlm_source = str(built / "vlm")
    return generator_source, vlm_source, model_version(profile)


def model_version(profile: Profile) -> str:
    """The version string recorded with every result, without loading or building anything."""
    if TINY_SOURCE in (profile.generator.source, profile.vlm.source):
        return f"tiny-v{BUILDER_VERSION}"
    return "+".join([
        f"{profile.generator.source}@{profile.generator.revision or 'main'}",
        f"{profile.vlm.source}@{profile.vlm.revision or 'main'}",
    ])
