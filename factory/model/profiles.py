"""Model profiles: a typed description of every component of the stack and how it loads.

A profile names sources (hub IDs or local paths) and loading options; the code path that loads them is the
same for every profile. `tiny` points at checkpoints that `factory.model.tiny` builds offline into the cache
folder; production profiles point at the real FLUX.1 checkpoints and a real VLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda", "auto"]

TINY_SOURCE = "tiny"  # resolved to a folder under FACTORY_HOME, built on first use


class GeneratorProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Hub ID, local folder of a diffusers FluxPipeline, or 'tiny'")
    revision: str | None = Field(default=None, description="Hub revision (commit or tag) to pin")
    dtype: Dtype = Field(default="bfloat16", description="Weights and compute dtype")
    device: Device = Field(default="auto", description="'auto' takes CUDA when present")
    cpu_offload: Literal["none", "model", "sequential"] = Field(
        default="none", description="diffusers CPU offload; 'model' saves ~1/3 memory for ~3x time"
    )
    steps: int = Field(default=28, ge=1, le=100, description="Default denoising steps")
    width: int = Field(default=1024, ge=16, le=2048, multiple_of=16)
    height: int = Field(default=1024, ge=16, le=2048, multiple_of=16)
    guidance: float = Field(default=3.5, ge=0.0, le=30.0, description="Distilled guidance (FLUX.1-dev)")
    max_sequence_length: int = Field(default=512, ge=16, le=512, description="T5 prompt tokens")


class VLMProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Hub ID, local folder loadable by AutoModelForImageTextToText, or 'tiny'")
    revision: str | None = None
    dtype: Dtype = "bfloat16"
    device: Device = "auto"
    max_new_tokens: int = Field(default=64, ge=1, le=1024, description="Caption/answer length cap")
    caption_prompt: str = Field(
        default="Describe this image in one sentence.", description="Instruction used for captions"
    )


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    generator: GeneratorProfile
    vlm: VLMProfile


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        description="Small random-weight FLUX + LLaVA-style VLM built offline; same classes as production",
        generator=GeneratorProfile(
            source=TINY_SOURCE, dtype="float32", device="cpu", steps=4, width=256, height=256,
            guidance=3.5, max_sequence_length=64,
        ),
        vlm=VLMProfile(source=TINY_SOURCE, dtype="float32", device="cpu", max_new_tokens=16),
    ),
    "flux-dev": Profile(
        name="flux-dev",
        description="FLUX.1-dev (28 steps, guidance-distilled) + Qwen2.5-VL-3B-Instruct, bf16 on GPU",
        generator=GeneratorProfile(source="black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5),
        vlm=VLMProfile(source="Qwen/Qwen2.5-VL-3B-Instruct"),
    ),
    "flux-schnell": Profile(
        name="flux-schnell",
        description="FLUX.1-schnell (4 steps, no guidance) + Qwen2.5-VL-3B-Instruct, bf16 on GPU",
        generator=GeneratorProfile(
            source="black-forest-labs/FLUX.1-schnell", steps=4, guidance=0.0, max_sequence_length=256
        ),
        vlm=VLMProfile(source="Qwen/Qwen2.5-VL-3B-Instruct"),
    ),
}


def factory_home() -> Path:
    """Where built checkpoints live: $FACTORY_HOME, else the user's cache dir."""
    configured = os.environ.get("FACTORY_HOME")
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("factory"))


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ConfigError(f"profile: unknown profile {name!r} (known: {known})") from None


def resolve_dtype(name: Dtype):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: Device) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
