"""Model profiles: a typed description of every component of the stack and how it loads.

A profile names sources (hub IDs or local paths) and loading options; the code path that loads them is the
same for every profile. `tiny` points at checkpoints that `factory.model.tiny` builds offline into the cache
folder; production profiles point at the real FLUX.1 checkpoints and a real VLM.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError
from factory.model.performance import Performance, WarmupShape

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
    performance: Performance = Field(
        default_factory=Performance, description="Speed options (compile, FP8, attention, step caching, VAE)"
    )


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
    max_pixels: int | None = Field(
        default=None, ge=1,
        description="Most pixels an input image becomes (and so its visual tokens): passed to processors that "
        "take it (Qwen2-VL / Qwen2.5-VL), applied as an aspect-preserving resize otherwise; archive jobs resize to "
        "it in their workers. None: the processor's own bound",
    )


class CostModel(BaseModel):
    """Model seconds per unit of work on the hardware a profile is meant for: what `factory validate` multiplies
    a job's counts by to say how long its models will run before any GPU is booked. Estimates, not promises."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware: str = Field(description="Where the figures hold")
    seconds_per_step_megapixel: float = Field(ge=0, description="Generation: seconds per denoising step per megapixel")
    seconds_per_caption: float = Field(ge=0)
    seconds_per_answer: float = Field(ge=0)
    seconds_per_safety_check: float = Field(ge=0, description="Per image scored (generated or input)")
    basis: str = Field(description="Where the figures come from")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    generator: GeneratorProfile
    vlm: VLMProfile
    cost: CostModel

    @property
    def wants_gpu(self) -> bool:
        """Whether a replica of this profile reserves a GPU by default. 'auto' is meant for GPUs (it takes CUDA when
        present); a replica without one would fall back to CPU and run a production model hundreds of times
        slower."""
        return self.generator.device != "cpu" or self.vlm.device != "cpu"

    def replica_gpus(self, num_gpus: float | None) -> float:
        """GPUs one replica reserves: `num_gpus` (a job's or fleet's serve.num_gpus) when set, else one for a GPU
        profile and none for a CPU one."""
        if num_gpus is not None:
            return float(num_gpus)
        return 1.0 if self.wants_gpu else 0.0


# Published: FLUX.1-dev, 28 steps at 1024x1024 (1.05 MP), plain diffusers bf16 on one H100: 6.7 s per image
# (PyTorch blog "torch.compile and Diffusers"); the 4-step schnell has the same transformer, so the same cost
# per step. The VLM and detector figures are rough single-request figures for a 3B VLM and NudeNet on CPU.
_H100_BF16 = CostModel(
    hardware="one H100, bf16, plain diffusers", seconds_per_step_megapixel=6.7 / (28 * 1.048576),
    seconds_per_caption=0.25, seconds_per_answer=0.25, seconds_per_safety_check=0.08,
    basis="FLUX.1-dev 6.7 s/image at 1024x1024, 28 steps (PyTorch blog); VLM and NudeNet figures are rough",
)


def _production_performance(steps: int) -> Performance:
    """The fastest settings that keep the numbers close to plain bf16 (bench/gpu_flux.py measures the drift):
    blocks compiled regionally (seconds to compile, unlike the whole transformer with FP8), FP8 rowwise on the
    blocks' linear layers, the VAE in channels-last and tiled past 1536x1536, the default shape warmed up.
    Off here, each for a reason: fused QKV (it would make LoRAs on to_q/to_k/to_v silently do nothing, and
    regional adapters target exactly those), step caching (it skips work and changes images; a job opts in with
    `performance.cache`), a non-default attention backend (torch's SDPA picks a fused kernel already; cuDNN
    and FlashAttention-3 are one setting away where the bench shows them faster)."""
    return Performance(
        compile="regional", quantization="fp8", vae_channels_last=True, vae_tiling_min_pixels=1536 * 1536,
        warmup=(WarmupShape(width=1024, height=1024, steps=steps),),
    )


# Qwen2.5-VL makes one visual token per 28x28 pixels: 448x448 is 256 tokens, enough for a one-sentence caption or
# a short answer (Ray's own Qwen2.5-VL-3B batch example resizes to 225x225), where the processor's default bound
# (12.8 M pixels, ~16k tokens) lets one large photo cost as much as 60 small ones.
_QWEN_CAPTION_PIXELS = 448 * 448


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        description="Small random-weight FLUX + LLaVA-style VLM built offline; same classes as production",
        generator=GeneratorProfile(
            source=TINY_SOURCE, dtype="float32", device="cpu", steps=4, width=256, height=256,
            guidance=3.5, max_sequence_length=64,
        ),
        # 320x320: the tiny CLIP reads 64x64, but the safety detector works at 320x320 on the same pixels.
        vlm=VLMProfile(source=TINY_SOURCE, dtype="float32", device="cpu", max_new_tokens=16, max_pixels=320 * 320),
        # Measured by bench/tasks.py on a 2-core CPU (docs/benchmarks.md): 34 ms per 256x256 image at 4 steps
        # in batches of 4, 8.5 ms per caption or answer in batches of 4, 23 ms per NudeNet check.
        cost=CostModel(
            hardware="2 CPU cores", seconds_per_step_megapixel=0.034 / (4 * 0.065536), seconds_per_caption=0.0085,
            seconds_per_answer=0.0083, seconds_per_safety_check=0.023, basis="bench/tasks.py on this CPU",
        ),
    ),
    "flux-dev": Profile(
        name="flux-dev",
        description="FLUX.1-dev (28 steps, guidance-distilled) + Qwen2.5-VL-3B-Instruct, bf16 on GPU, blocks "
        "compiled, FP8 linear layers",
        generator=GeneratorProfile(
            source="black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5, performance=_production_performance(28)
        ),
        vlm=VLMProfile(source="Qwen/Qwen2.5-VL-3B-Instruct", max_pixels=_QWEN_CAPTION_PIXELS),
        cost=_H100_BF16,
    ),
    "flux-schnell": Profile(
        name="flux-schnell",
        description="FLUX.1-schnell (4 steps, no guidance) + Qwen2.5-VL-3B-Instruct, bf16 on GPU, blocks "
        "compiled, FP8 linear layers",
        generator=GeneratorProfile(
            source="black-forest-labs/FLUX.1-schnell", steps=4, guidance=0.0, max_sequence_length=256,
            performance=_production_performance(4),
        ),
        vlm=VLMProfile(source="Qwen/Qwen2.5-VL-3B-Instruct", max_pixels=_QWEN_CAPTION_PIXELS),
        cost=_H100_BF16,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ConfigError(f"profile: unknown profile {name!r} (known: {known})") from None


def with_performance(profile: Profile, overrides: dict | None) -> Profile:
    """`profile` with some of its generator's speed options replaced (a job's `performance:` section): the
    named top-level options win, the others keep the profile's values."""
    if not overrides:
        return profile
    merged = Performance.model_validate(profile.generator.performance.model_dump() | overrides)
    return profile.model_copy(update={"generator": profile.generator.model_copy(update={"performance": merged})})


def resolve_dtype(name: Dtype):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: Device) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
