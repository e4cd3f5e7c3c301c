"""The typed options of one LoRA training run: what the adapter is (rank, alpha, layers), how it is trained
(steps, batch, learning rate and schedule, timestep sampling, guidance, buckets, caption dropout, precision) and
how it is watched (checkpoint and validation cadence, held-out images, seed).

Defaults follow diffusers' `train_dreambooth_lora_flux.py` where it has one (rank 4-16 on the attention
projections, AdamW at 1e-4, guidance 3.5 for FLUX.1-dev) and ai-toolkit / kohya where it does not (caption
dropout, `flux_shift` timestep sampling, aspect buckets).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TimestepSampling = Literal["uniform", "logit_normal", "mode", "flux_shift"]
LrSchedule = Literal["constant", "cosine", "linear"]
Precision = Literal["profile", "float32", "bfloat16"]

# The attention projections of FLUX's double blocks (image stream) and single blocks: diffusers' default set.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class Bucket(BaseModel):
    """One training resolution. Each image goes to the bucket nearest its aspect ratio and is resized and
    centre-cropped to it; a batch holds images of one bucket only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(ge=64, le=2048, multiple_of=16, description="Pixels; a multiple of 16 (FLUX packs 2x2 "
                       "latent patches of an 8x VAE)")
    height: int = Field(ge=64, le=2048, multiple_of=16, description="Pixels; a multiple of 16")


class TrainOptions(BaseModel):
    """How one adapter is trained. Every field has a default; a spec names only what it changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=16, ge=1, le=512, description="LoRA rank r (diffusers' FLUX script: 4-16)")
    alpha: float | None = Field(
        default=None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Unset: equal to rank")
    target_modules: tuple[str, ...] = Field(
        default=DEFAULT_TARGETS, min_length=1,
        description="Linear layers (by name, as peft matches them) that get a LoRA pair; each must exist in the "
        "profile's transformer",
    )
    steps: int = Field(default=1000, ge=1, le=1_000_000, description="Optimizer steps")
    batch_size: int = Field(
        default=4, ge=1, le=4096,
        description="Images per optimizer step over all workers (the global batch); a multiple of workers",
    )
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0, description="AdamW peak learning rate")
    lr_schedule: LrSchedule = Field(default="constant", description="After warm-up: constant, cosine or linear decay")
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warm-up from 0 to learning_rate")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay (diffusers' default)")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradients are clipped to this norm")
    timestep_sampling: TimestepSampling = Field(
        default="logit_normal",
        description="How each sample's noise level sigma is drawn: uniform; logit_normal (SD3 / diffusers' "
        "default for FLUX); mode (SD3's mode sampling); flux_shift (kohya / ai-toolkit: logit-normal shifted "
        "toward noise by the image's token count, as FLUX's sampler shifts at inference)",
    )
    logit_mean: float = Field(default=0.0, description="Mean of the logit-normal (logit_normal, flux_shift)")
    logit_std: float = Field(default=1.0, gt=0, description="Std of the logit-normal (logit_normal, flux_shift)")
    mode_scale: float = Field(default=1.29, description="Scale of mode sampling (SD3's 1.29)")
    guidance: float | None = Field(
        default=None, ge=0, le=30,
        description="Value fed to the guidance embedding of a guidance-distilled transformer (FLUX.1-dev). "
        "Unset: the profile's guidance. Ignored by transformers without one (FLUX.1-schnell)",
    )
    buckets: tuple[Bucket, ...] | None = Field(
        default=None, min_length=1,
        description="Training resolutions ({width, height}); unset: the profile's default image size",
    )
    caption_dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="Fraction of samples trained with the empty caption's embedding instead of their own, so the "
        "style also applies to prompts that do not describe it",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seeds the LoRA init, data order, noise and "
                      "sigmas: the same seed and data give the same adapter, bit for bit on CPU")
    checkpoint_every: int = Field(
        default=100, ge=1, description="Steps between checkpoints (and the last step); a resumed run starts "
        "from the last one")
    checkpoints_kept: int = Field(default=2, ge=1, description="Most recent checkpoints kept in the run's storage")
    validation_every: int = Field(
        default=0, ge=0, description="Steps between validations (held-out loss and sample images); 0: only "
        "before the first and after the last step")
    validation_prompts: tuple[Annotated[str, Field(min_length=1, max_length=2000)], ...] = Field(
        default=(), description="Prompts generated at each validation; unset: captions of held-out images")
    validation_images: int = Field(
        default=4, ge=0, le=64, description="Images per validation when prompts come from held-out captions")
    held_out_fraction: float = Field(
        default=0.1, ge=0, le=0.5,
        description="Fraction of the images (at least one when above 0) kept out of training to measure the "
        "held-out flow-matching loss at each validation; chosen by image digest, so copies stay together",
    )
    gradient_checkpointing: bool | None = Field(
        default=None, description="Recompute activations in the backward pass (less memory, ~30 % more time); "
        "unset: as the profile says")
    precision: Precision = Field(
        default="profile", description="Weights and compute dtype of the frozen model; the LoRA weights and "
        "optimizer stay float32. 'profile': the profile's dtype")

    @field_validator("target_modules")
    @classmethod
    def _distinct_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("names a layer twice")
        return value

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> TrainOptions:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)
