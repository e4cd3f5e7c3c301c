"""The multi-task stack: one object per process holding the generator and the VLM of one profile, and, when its
results are to be scored, the profile's CLIP model beside them (loaded once, like the others)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from PIL import Image

from factory.errors import ModelError
from factory.model.clip import ClipScorer, pin_clip, scoring_model
from factory.model.generator import EditParams, FluxGenerator, GenerationParams
from factory.logs import quiet_library_noise
from factory.model.profiles import TINY_FLUX2_SOURCE, TINY_SOURCE, Profile, get_profile
from factory.model.revisions import is_hub_source, pin_revisions
from factory.paths import factory_home
from factory.model.tiny import BUILDER_VERSION, FLUX2_BUILDER_VERSION, ensure_tiny, ensure_tiny_flux2
from factory.model.vlm import VisionLanguageModel

log = structlog.get_logger(__name__)


@dataclass
class ModelStack:
    profile: Profile
    generator: FluxGenerator
    vlm: VisionLanguageModel
    model_version: str
    load_seconds: float = field(default=0.0)
    clip: ClipScorer | None = field(default=None)  # None: this stack's images are not scored

    @classmethod
    def from_profile(cls, profile: Profile | str, home: Path | None = None, *, clip_score: bool = False,
                     clip_revision: str | None = None) -> ModelStack:
        """The profile's models; with `clip_score`, its CLIP model too (at `clip_revision`, the job's commit)."""
        profile = get_profile(profile) if isinstance(profile, str) else profile
        quiet_library_noise()
        started = time.perf_counter()
        # Before any weights load: a profile that cannot score fails at once, not after minutes of loading.
        clip_model = pin_clip(scoring_model(profile), clip_revision) if clip_score else None
        # A replica normally gets its job's commits (nothing to resolve); alone (the CLI's single row) it resolves
        # them itself, so what loads and what results record is always one commit.
        profile = pin_revisions(profile)
        generator_source, vlm_source, version = resolve_sources(profile, home)
        try:
            generator = FluxGenerator.from_pretrained(generator_source, profile.generator,
                                                      edit_transformer=profile.edit_transformer)
            vlm = VisionLanguageModel.from_pretrained(vlm_source, profile.vlm)
        except (OSError, ValueError) as error:
            raise ModelError(f"profile {profile.name}: cannot load models: {error}") from error
        clip = ClipScorer.from_profile(clip_model, home) if clip_model is not None else None
        seconds = time.perf_counter() - started
        log.info("stack loaded", profile=profile.name, seconds=round(seconds, 2), clip=clip is not None)
        return cls(profile, generator, vlm, version, seconds, clip)

    def generate(self, params: list[GenerationParams]) -> list[Image.Image]:
        return self.generator.generate(params)

    def edit(self, params: list[EditParams]) -> list[Image.Image]:
        return self.generator.edit(params)

    def caption(self, images: list[Image.Image], instructions: list[str | None] | None = None) -> list[str]:
        return self.vlm.caption(images, instructions)

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        return self.vlm.answer(images, questions)

    def clip_score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        if self.clip is None:
            raise ModelError("this stack was loaded without a CLIP model (quality.clip_score off)")
        return self.clip.score(images, prompts)


def resolve_sources(profile: Profile, home: Path | None = None) -> tuple[str, str, str]:
    """Where each component loads from, and a version string recorded with every result."""
    generator_source, vlm_source = profile.generator.source, profile.vlm.source
    if TINY_SOURCE in (generator_source, vlm_source):
        built = ensure_tiny(home or factory_home())
        if generator_source == TINY_SOURCE:
            generator_source = str(built / "flux")
        if vlm_source == TINY_SOURCE:
            vlm_source = str(built / "vlm")
    if generator_source == TINY_FLUX2_SOURCE:
        generator_source = str(ensure_tiny_flux2(home or factory_home()) / "flux2")
    return generator_source, vlm_source, model_version(profile)


def model_version(profile: Profile) -> str:
    """The version string recorded with every result, without loading or building anything: each hub
    component as `org/name@<commit>` once the profile is pinned (`pin_revisions`; unpinned, the branch it would
    follow), a local folder as its path."""
    if profile.generator.source == TINY_FLUX2_SOURCE:
        return f"tiny-flux2-v{FLUX2_BUILDER_VERSION}+tiny-v{BUILDER_VERSION}"
    if TINY_SOURCE in (profile.generator.source, profile.vlm.source):
        return f"tiny-v{BUILDER_VERSION}"
    return "+".join(
        f"{c.source}@{c.revision or 'main'}" if is_hub_source(c.source) or c.revision else c.source
        for c in profile.components.values()
    )
