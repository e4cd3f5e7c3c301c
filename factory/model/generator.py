"""Text-to-image with a diffusers FluxPipeline: one pipeline call per group of compatible requests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import structlog
from PIL import Image

from factory.model.profiles import GeneratorProfile, resolve_device, resolve_dtype

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    guidance: float

    @property
    def call_shape(self) -> tuple[int, int, int, float]:
        """Requests that share these can go through one pipeline call."""
        return (self.steps, self.width, self.height, self.guidance)


PIPELINE_CLASS = "FluxPipeline"


def load_options(profile: GeneratorProfile) -> dict:
    """Keyword arguments for `FluxPipeline.from_pretrained`, the same for tiny and production profiles."""
    # safetensors only: a pickle checkpoint is never loaded, whatever the source holds.
    return {"revision": profile.revision, "dtype": resolve_dtype(profile.dtype), "use_safetensors": True}


class FluxGenerator:
    """Holds a FluxPipeline loaded with `from_pretrained`; batches prompts into single pipeline calls."""

    def __init__(self, pipe, profile: GeneratorProfile):
        self.pipe = pipe
        self.profile = profile
        self.device = resolve_device(profile.device)
        # diffusers' progress bar floods replica logs; progress is reported by the job instead.
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, source: str | Path, profile: GeneratorProfile) -> FluxGenerator:
        from diffusers import FluxPipeline

        started = time.perf_counter()
        pipe = FluxPipeline.from_pretrained(str(source), **load_options(profile))
        device = resolve_device(profile.device)
        if profile.cpu_offload == "model" and device == "cuda":
            pipe.enable_model_cpu_offload()
        elif profile.cpu_offload == "sequential" and device == "cuda":
            pipe.enable_sequential_cpu_offload()
        else:
            pipe.to(device)
        log.info("generator loaded", source=str(source), seconds=round(time.perf_counter() - started, 2))
        return cls(pipe, profile)

    def generate(self, params: list[GenerationParams]) -> list[Image.Image]:
        """Images in the order of `params`. Each image depends only on its own params, never on neighbours:
        every row gets its own seeded torch.Generator, which diffusers uses for that row's latents."""
        import torch

        images: list[Image.Image | None] = [None] * len(params)
        order = sorted(range(len(params)), key=lambda i: params[i].call_shape)
        for shape, members in groupby(order, key=lambda i: params[i].call_shape):
            indices = list(members)
            steps, width, height, guidance = shape
            generators = [torch.Generator("cpu").manual_seed(params[i].seed) for i in indices]
            output = self.pipe(
                prompt=[params[i].prompt for i in indices], num_inference_steps=steps, width=width,
                height=height, guidance_scale=guidance, generator=generators,
                max_sequence_length=self.profile.max_sequence_length, output_type="pil",
            )
            for index, image in zip(indices, output.images, strict=True):
                images[index] = image
        return images  # type: ignore[return-value]
