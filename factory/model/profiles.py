"""Model profiles: a typed description of every component of the stack and how it loads.

A profile names sources (hub IDs or local paths) and loading options; the code path that loads them is the
same for every profile. `tiny` and `tiny-flux2` point at checkpoints that `factory.model.tiny` builds offline into
the cache folder; production profiles point at the real FLUX.1 / FLUX.2 [klein] checkpoints and a real VLM. A
profile says whether its generator edits (`GeneratorProfile.edit`: how many references) and under which licence
its weights are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.errors import ConfigError
from factory.model.performance import Performance, WarmupShape

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda", "auto"]

TINY_SOURCE = "tiny"  # resolved to a folder under FACTORY_HOME, built on first use
TINY_FLUX2_SOURCE = "tiny-flux2"  # the same, for the tiny FLUX.2 [klein] generator
# Which diffusers pipelines load a generator checkpoint: FLUX.1 as FluxPipeline (FluxKontextPipeline for edits, on
# the same components), FLUX.2 [klein] as Flux2KleinPipeline for both.
Family = Literal["flux1", "flux2"]

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# `org/name@revision`: a hub ID with its revision written into it (a local path never looks like this).
_PINNED_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<revision>[\w./-]+)$")


class ModelSource(BaseModel):
    """Where one component of a profile loads from. A hub ID is pinned by `revision` or written `org/name@<commit>`;
    a branch or tag (or no revision: the default branch) is resolved to its commit once per job
    (`factory.model.revisions`), so every replica loads, and every result records, one commit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Hub ID (optionally `org/name@<revision>`), local folder, or 'tiny'")
    revision: str | None = Field(
        default=None, description="Hub revision: a 40-hex commit (pinned) or a branch or tag, resolved to its commit"
    )

    @model_validator(mode="before")
    @classmethod
    def _revision_from_source(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("source"), str):
            return data
        match = _PINNED_HUB_ID.match(data["source"])
        if match is None:
            return data
        if data.get("revision") not in (None, match["revision"]):
            raise ValueError(f"source {data['source']!r} names revision {match['revision']!r}, "
                             f"revision says {data['revision']!r}")
        return {**data, "source": match["repo"], "revision": match["revision"]}

    @property
    def pinned(self) -> bool:
        """Whether `revision` is a commit (nothing left to resolve)."""
        return self.revision is not None and COMMIT.match(self.revision) is not None


class EditOptions(BaseModel):
    """What the `edit` task may ask of a generator: one or several reference images and an instruction give an
    image. A generator without these cannot edit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_references: int = Field(ge=1, le=10, description="Most reference images one edit row may give")
    reference_pixels: int = Field(
        ge=256, le=2048 * 2048, description="Pixels each reference is resized to before it is encoded (aspect kept, "
        "sides multiples of 16): its tokens join the image's in every denoising step",
    )
    guidance: float | None = Field(
        default=None, ge=0.0, le=30.0, description="Default guidance of edit rows; None: the generator's"
    )


class GeneratorProfile(ModelSource):
    source: str = Field(description="Hub ID (optionally `org/name@<revision>`), local folder of a diffusers "
                        "FluxPipeline, or 'tiny'")
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
    family: Family = Field(
        default="flux1", description="'flux1': FluxPipeline, edits as FluxKontextPipeline on its components; "
        "'flux2': Flux2KleinPipeline for text-to-image and edits",
    )
    text_encoder_layers: tuple[int, ...] | None = Field(
        default=None, description="FLUX.2: the text encoder's hidden-state layers stacked into the prompt embedding "
        "(None: the pipeline's (9, 18, 27), made for Qwen3-4B's 36 layers)",
    )
    edit: EditOptions | None = Field(default=None, description="How edit rows run; None: this generator cannot edit")

    def edit_pixels(self, references: int, width: int | None = None, height: int | None = None) -> int:
        """Pixels one edit runs its transformer over at every step: the output's (the profile's default when not
        given) and every reference's. What a cost estimate multiplies by steps, as for text-to-image."""
        if self.edit is None:
            raise ConfigError("this generator cannot edit")
        output = (width or self.width) * (height or self.height)
        return output + references * self.edit.reference_pixels


class VLMProfile(ModelSource):
    source: str = Field(description="Hub ID (optionally `org/name@<revision>`), local folder loadable by "
                        "AutoModelForImageTextToText, or 'tiny'")
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


# torchmetrics' CLIPScore default model, the one published CLIPScore figures are usually measured with.
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"


class ClipProfile(ModelSource):
    """The CLIP model a run's CLIPScore is measured with. Loaded beside the stack only when a job asks for scores."""

    source: str = Field(description="Hub ID (optionally `org/name@<revision>`), local folder loadable by CLIPModel "
                        "and CLIPProcessor, or 'tiny'")
    dtype: Dtype = Field(default="bfloat16", description="Weights and compute dtype (the cosine is taken in float32)")
    device: Device = Field(default="auto", description="'auto' takes CUDA when present")


class QualityProfile(BaseModel):
    """Models that score what the stack made rather than make it: not among `Profile.components`, so they are
    neither part of `model_version` nor resolved to commits for a job that does not score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: ClipProfile = Field(description="CLIP model for CLIPScore of generated images against their prompts")


class CostModel(BaseModel):
    """Model seconds per unit of work on the hardware a profile is meant for: what `factory validate` multiplies
    a job's counts by to say how long its models will run before any GPU is booked. Estimates, not promises. An
    edit costs `seconds_per_step_megapixel` per step over its output's and its references' megapixels
    (`GeneratorProfile.edit_pixels`): reference tokens run through every block with the image's."""

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
    quality: QualityProfile | None = Field(default=None, description="Scoring models; None: the profile cannot score")
    edit_transformer: ModelSource | None = Field(
        default=None, description="Checkpoint whose `transformer/` makes edits when the generator's does not (FLUX.1 "
        "Kontext [dev] beside FLUX.1 [dev]): loaded beside it, sharing its text encoders and VAE; None: edits "
        "run on the generator's own transformer",
    )
    licence: str = Field(description="The licence of the generator's weights, as `factory models list` shows it")

    @model_validator(mode="after")
    def _edit_transformer_needs_kontext(self) -> Profile:
        if self.edit_transformer is not None and (self.generator.edit is None or self.generator.family != "flux1"):
            raise ValueError("edit_transformer: a separate edit transformer needs a FLUX.1 generator with `edit` "
                             "options (FLUX.2 [klein] edits with its own)")
        return self

    @property
    def max_references(self) -> int:
        """Most reference images one edit row may give; 0: this profile cannot edit."""
        return self.generator.edit.max_references if self.generator.edit is not None else 0

    @property
    def wants_gpu(self) -> bool:
        """Whether a replica of this profile reserves a GPU by default. 'auto' is meant for GPUs (it takes CUDA when
        present); a replica without one would fall back to CPU and run a production model hundreds of times
        slower."""
        return self.generator.device != "cpu" or self.vlm.device != "cpu"

    @property
    def components(self) -> dict[str, ModelSource]:
        """Every checkpoint the profile loads, by field name ('generator', 'vlm', ...)."""
        return {name: value for name, value in self if isinstance(value, ModelSource)}

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


def _production_performance(steps: int, edit_references: int = 0) -> Performance:
    """The fastest settings that keep the numbers close to plain bf16 (bench/gpu_flux.py measures the drift):
    blocks compiled regionally (seconds to compile, unlike the whole transformer with FP8), FP8 rowwise on the
    blocks' linear layers, the VAE in channels-last and tiled past 1536x1536, the default shape warmed up.
    Off here, each for a reason: fused QKV (it would make LoRAs on to_q/to_k/to_v silently do nothing, and
    regional adapters target exactly those), step caching (it skips work and changes images; a job opts in with
    `performance.cache`), a non-default attention backend (torch's SDPA picks a fused kernel already; cuDNN
    and FlashAttention-3 are one setting away where the bench shows them faster). A profile that edits also warms
    up an edit with `edit_references` references: their tokens make a longer sequence, a shape of its own."""
    shapes = [WarmupShape(width=1024, height=1024, steps=steps)]
    if edit_references:
        shapes.append(WarmupShape(width=1024, height=1024, steps=steps, references=edit_references))
    return Performance(
        compile="regional", quantization="fp8", vae_channels_last=True, vae_tiling_min_pixels=1536 * 1536,
        warmup=tuple(shapes),
    )


# Published (third party, inferencebench.io; /work/shared/PERFORMANCE.md): FLUX.2 [klein] 4B at 1024x1024, 4 steps,
# ~0.57 s per image on one H100. An edit's reference tokens go through every block with the image's, so edits cost
# this per megapixel of output plus references (GeneratorProfile.edit_pixels).
_KLEIN_H100 = CostModel(
    hardware="one H100, bf16", seconds_per_step_megapixel=0.57 / (4 * 1.048576),
    seconds_per_caption=0.25, seconds_per_answer=0.25, seconds_per_safety_check=0.08,
    basis="FLUX.2 [klein] 4B ~0.57 s/image at 1024x1024, 4 steps, one H100 (inferencebench.io, third party); VLM "
    "and NudeNet figures are rough",
)

_FLUX1_DEV_LICENCE = ("FLUX.1 [dev] Non-Commercial License: non-commercial use of the weights; commercial use needs a "
                      "licence from Black Forest Labs")
_TINY_LICENCE = "none: random weights built on this machine"


# Qwen2.5-VL makes one visual token per 28x28 pixels: 448x448 is 256 tokens, enough for a one-sentence caption or
# a short answer (Ray's own Qwen2.5-VL-3B batch example resizes to 225x225), where the processor's default bound
# (12.8 M pixels, ~16k tokens) lets one large photo cost as much as 60 small ones.
_QWEN_CAPTION_PIXELS = 448 * 448

_PRODUCTION_QUALITY = QualityProfile(clip=ClipProfile(source=CLIPSCORE_MODEL))


# The tiny profiles' VLM, scoring model and cost, shared by both tiny generators. 320x320: the tiny CLIP reads
# 64x64, but the safety detector works at 320x320 on the same pixels. Cost measured by bench/tasks.py on a 2-core
# CPU (docs/benchmarks.md) for `tiny`: 34 ms per 256x256 image at 4 steps in batches of 4, 8.5 ms per caption or
# answer in batches of 4, 23 ms per NudeNet check (tiny-flux2's transformer is smaller: an overestimate there).
_TINY_VLM = VLMProfile(source=TINY_SOURCE, dtype="float32", device="cpu", max_new_tokens=16, max_pixels=320 * 320)
_TINY_QUALITY = QualityProfile(clip=ClipProfile(source=TINY_SOURCE, dtype="float32", device="cpu"))
_TINY_CPU = CostModel(
    hardware="2 CPU cores", seconds_per_step_megapixel=0.034 / (4 * 0.065536), seconds_per_caption=0.0085,
    seconds_per_answer=0.0083, seconds_per_safety_check=0.023, basis="bench/tasks.py on this CPU",
)

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        description="Small random-weight FLUX + LLaVA-style VLM built offline; same classes as production",
        generator=GeneratorProfile(
            source=TINY_SOURCE, dtype="float32", device="cpu", steps=4, width=256, height=256,
            guidance=3.5, max_sequence_length=64,
            # Its FLUX.1 components also run as FluxKontextPipeline: the Kontext edit path, one reference.
            edit=EditOptions(max_references=1, reference_pixels=256 * 256),
        ),
        vlm=_TINY_VLM,
        cost=_TINY_CPU,
        quality=_TINY_QUALITY,
        licence=_TINY_LICENCE,
    ),
    "tiny-flux2": Profile(
        name="tiny-flux2",
        description="Small random-weight FLUX.2 [klein] (Flux2KleinPipeline: Qwen3 text encoder, FLUX.2 VAE) built "
        "offline, text-to-image and edits with up to 4 references, + the tiny VLM; same classes as production",
        generator=GeneratorProfile(
            source=TINY_FLUX2_SOURCE, family="flux2", dtype="float32", device="cpu", steps=4, width=256, height=256,
            # Step-distilled like klein 4B: guidance is not used, 1.0 says so.
            guidance=1.0, max_sequence_length=64, text_encoder_layers=(1, 2, 3),
            edit=EditOptions(max_references=4, reference_pixels=256 * 256),
        ),
        vlm=_TINY_VLM,
        cost=_TINY_CPU,
        quality=_TINY_QUALITY,
        licence=_TINY_LICENCE,
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
        quality=_PRODUCTION_QUALITY,
        licence=_FLUX1_DEV_LICENCE,
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
        quality=_PRODUCTION_QUALITY,
        licence="Apache-2.0 (FLUX.1 [schnell]): commercial use allowed",
    ),
    "flux-kontext": Profile(
        name="flux-kontext",
        description="FLUX.1-dev for text-to-image and FLUX.1 Kontext [dev] for edits (one reference), sharing text "
        "encoders and VAE (two transformers, ~24 GB each in bf16), + Qwen2.5-VL-3B-Instruct, bf16 on GPU, blocks "
        "compiled, FP8 linear layers",
        generator=GeneratorProfile(
            source="black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5,
            performance=_production_performance(28, edit_references=1),
            # Kontext [dev]'s recommended guidance is 2.5; references at ~1 MP, as its preferred resolutions are.
            edit=EditOptions(max_references=1, reference_pixels=1024 * 1024, guidance=2.5),
        ),
        edit_transformer=ModelSource(source="black-forest-labs/FLUX.1-Kontext-dev"),
        vlm=VLMProfile(source="Qwen/Qwen2.5-VL-3B-Instruct", max_pixels=_QWEN_CAPTION_PIXELS),
        # Kontext's transformer is FLUX.1-dev's architecture: the same cost per step and megapixel.
        cost=_H100_BF16,
        quality=_PRODUCTION_QUALITY,
        licence=_FLUX1_DEV_LICENCE + " (FLUX.1-dev and FLUX.1 Kontext [dev])",
    ),
    "flux2-klein": Profile(
        name="flux2-klein",
        description="FLUX.2 [klein] 4B (4 steps, step-distilled) for text-to-image and edits with up to 4 "
        "references, + Qwen2.5-VL-3B-Instruct, bf16 on GPU, blocks compiled, FP8 linear layers",
        generator=GeneratorProfile(
            source="black-forest-labs/FLUX.2-klein-4B", family="flux2", steps=4, guidance=1.0,
            performance=_production_performance(4, edit_references=1),
            edit=EditOptions(max_references=4, reference_pixels=1024 * 1024),
        ),
        vlm=VLMProfile(source="Qwen/Qwen2.5-VL-3B-Instruct", max_pixels=_QWEN_CAPTION_PIXELS),
        cost=_KLEIN_H100,
        quality=_PRODUCTION_QUALITY,
        licence="Apache-2.0 (FLUX.2 [klein] 4B): commercial use allowed",
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


def with_revisions(profile: Profile, revisions: Mapping[str, str] | None) -> Profile:
    """`profile` with the revisions of the named components replaced (a job's pinned commits); the others keep
    theirs."""
    if not revisions:
        return profile
    components = profile.components
    unknown = sorted(set(revisions) - set(components))
    if unknown:
        raise ConfigError(f"revisions: profile {profile.name} has no component {unknown[0]!r} "
                          f"(it has: {', '.join(components)})")
    return profile.model_copy(update={
        name: components[name].model_copy(update={"revision": revision}) for name, revision in revisions.items()
    })


def resolve_dtype(name: Dtype):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: Device) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
