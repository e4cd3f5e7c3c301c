"""CLIPScore of images against their prompts, as torchmetrics defines it, with any `CLIPModel` checkpoint.

CLIPScore(I, C) = max(100 * cos(E_I, E_C), 0) with E the model's projected image and text embeddings. Text is
tokenized without truncation and then cut to the text model's positions, as torchmetrics does, so a prompt longer
than 77 tokens scores the same here as there. The model and processor load through `from_pretrained` like every
other checkpoint of a profile; `CLIPProcessor` picks the PIL image processor where torchvision is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog
from PIL import Image

from factory.errors import ConfigError, ModelError
from factory.model.profiles import TINY_SOURCE, ClipProfile, Profile, resolve_device, resolve_dtype
from factory.model.revisions import is_hub_source, resolve_commit
from factory.model.tiny import BUILDER_VERSION, ensure_tiny
from factory.paths import factory_home

log = structlog.get_logger(__name__)


def scoring_model(profile: Profile) -> ClipProfile:
    """The CLIP model `profile` scores with; a profile that names none cannot score (one line)."""
    if profile.quality is None:
        raise ConfigError(f"quality.clip_score: profile {profile.name!r} names no CLIP model to score with "
                          "(its quality.clip); turn clip_score off or use a profile that has one")
    return profile.quality.clip


def pin_clip(clip: ClipProfile, revision: str | None = None) -> ClipProfile:
    """`clip` at `revision` (a job's; default the profile's), a hub model's resolved to the commit it points at
    now (a commit needs no resolving): every replica of a job scores with the same weights, as it generates with
    the same."""
    if revision is not None:
        clip = clip.model_copy(update={"revision": revision})
    if is_hub_source(clip.source) and not clip.pinned:
        return clip.model_copy(update={"revision": resolve_commit(clip.source, clip.revision)})
    return clip


def clip_version(clip: ClipProfile) -> str:
    """What scored, as `quality.json` records it: `org/name@<commit>` for a (pinned) hub model, the builder's
    version for the tiny one, a local folder's path."""
    if clip.source == TINY_SOURCE:
        return f"tiny-v{BUILDER_VERSION}"
    if is_hub_source(clip.source) or clip.revision:
        return f"{clip.source}@{clip.revision or 'main'}"
    return clip.source


def load_options(profile: ClipProfile) -> dict:
    """Keyword arguments for `CLIPModel.from_pretrained`."""
    return {"revision": profile.revision, "dtype": resolve_dtype(profile.dtype), "use_safetensors": True}


def clip_source(profile: ClipProfile, home: Path | None = None) -> str:
    """Where the CLIP model loads from: the profile's source, or the built tiny folder for 'tiny'."""
    if profile.source == TINY_SOURCE:
        return str(ensure_tiny(home or factory_home()) / "clip")
    return profile.source


class ClipScorer:
    """One CLIP model and its processor, loaded once per process and asked for whole batches."""

    def __init__(self, model, processor, profile: ClipProfile):
        self.model = model
        self.processor = processor
        self.profile = profile
        self.device = resolve_device(profile.device)
        self.max_text_tokens = model.config.text_config.max_position_embeddings

    @classmethod
    def from_profile(cls, profile: ClipProfile, home: Path | None = None) -> ClipScorer:
        return cls.from_pretrained(clip_source(profile, home), profile)

    @classmethod
    def from_pretrained(cls, source: str | Path, profile: ClipProfile) -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        started = time.perf_counter()
        try:
            processor = CLIPProcessor.from_pretrained(str(source), revision=profile.revision)
            model = CLIPModel.from_pretrained(str(source), **load_options(profile))
        except (OSError, ValueError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelError(f"clip {source}: cannot load: {reason}") from error
        model = model.to(resolve_device(profile.device)).eval()
        log.info("clip loaded", source=str(source), seconds=round(time.perf_counter() - started, 2))
        return cls(model, processor, profile)

    def score(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        """CLIPScore of each image against the text at the same position, in [0, 100]."""
        import torch

        if len(images) != len(texts):
            raise ModelError(f"clip score: {len(images)} images but {len(texts)} texts")
        if not images:
            return []
        tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            image_embeds = self.model.get_image_features(
                pixel_values=pixels.to(self.device, self.model.dtype)
            ).pooler_output
            text_embeds = self.model.get_text_features(
                input_ids=tokens["input_ids"][:, : self.max_text_tokens].to(self.device),
                attention_mask=tokens["attention_mask"][:, : self.max_text_tokens].to(self.device),
            ).pooler_output
        # Normalised and compared in float32 whatever the weights' dtype: bf16 keeps about three digits.
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        cosine = (image_embeds * text_embeds).sum(dim=-1)
        return (100 * cosine).clamp(min=0).cpu().tolist()
