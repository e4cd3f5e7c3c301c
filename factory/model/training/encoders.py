"""The encoders a training run needs once per image: the VAE (image -> latents) and the profile's text encoders
(caption -> prompt embeddings), loaded as a `FluxPipeline` without its transformer, so the actor that holds them
holds nothing else.

Captions go through the pipeline's own `encode_prompt` (CLIP's pooled embedding and T5's sequence for FLUX.1),
exactly as generation encodes a prompt. Latents are the VAE posterior's mean, shifted and scaled as FLUX's
transformer reads them; the mean rather than a sample keeps the cache a function of the image alone. Each image and
each caption is encoded on its own: batched convolutions and matmuls may take other kernels and differ in the last
bits, and a cached sample must not depend on which others Ray Data put in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog
from PIL import Image

from factory.model.generator import load_options
from factory.model.profiles import GeneratorProfile, resolve_device

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EncodedSample:
    """What training reads for one image: float32 arrays, shapes as the transformer takes them (no batch axis)."""

    latents: np.ndarray  # (channels, height / 8, width / 8)
    prompt_embeds: np.ndarray  # (tokens, dim): T5's sequence for FLUX.1
    pooled_embeds: np.ndarray  # (dim,): CLIP's pooled embedding


def pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as the VAE reads it: (1, 3, H, W) in [-1, 1]."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


class TrainingEncoders:
    """The VAE and text encoders of a profile, on its device, in its dtype."""

    def __init__(self, pipe, profile: GeneratorProfile):
        self.pipe = pipe
        self.profile = profile
        self.device = resolve_device(profile.device)
        config = pipe.vae.config
        self.shift, self.scale = float(config.shift_factor or 0.0), float(config.scaling_factor)

    @classmethod
    def from_pretrained(cls, source: str | Path, profile: GeneratorProfile) -> TrainingEncoders:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(source), transformer=None, **load_options(profile))
        pipe.set_progress_bar_config(disable=True)
        pipe.to(resolve_device(profile.device))
        log.info("training encoders loaded", source=str(source))
        return cls(pipe, profile)

    def encode(self, image: Image.Image, caption: str) -> EncodedSample:
        return EncodedSample(self.encode_image(image), *self.encode_caption(caption))

    def encode_image(self, image: Image.Image) -> np.ndarray:
        import torch

        vae = self.pipe.vae
        with torch.inference_mode():
            posterior = vae.encode(pixels(image).to(self.device, vae.dtype)).latent_dist
            latents = (posterior.mean - self.shift) * self.scale
        return latents[0].float().cpu().numpy()

    def encode_caption(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            prompt_embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=[caption], prompt_2=None, device=self.device,
                max_sequence_length=self.profile.max_sequence_length,
            )
        return prompt_embeds[0].float().cpu().numpy(), pooled[0].float().cpu().numpy()
