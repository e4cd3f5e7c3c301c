"""Where a training run's own objects live under OUTPUT/<run id>/ (a local folder or an s3:// prefix), beside
what every run writes there (`factory.io.layout`: `_chunks/` with the plan and the chunks' markers, `rejects/
tenant=<t>/` with the images and captions that could not be used, `summary.json`, `_SUCCESS`).

    train_spec.json                         what the run trains (a resumed run must match it)
    cache/latents/part-<chunk>-<writer>-<n>.parquet   VAE latents and caption embeddings, one row per image,
                                            committed by the chunk's encoder worker (the run's model stage)
    cache/empty_caption.parquet             the empty caption's embeddings (caption dropout only)
    checkpoints/step-<n>/                   Ray Train checkpoints (adapter, optimizer, progress), its own state
    validation/base/<i>.png                 the base model's image for each validation prompt
    validation/step-<n>/<i>.png             the adapter's at step n
    validation/prompts.json                 the prompts, in order
    adapter/<name>.safetensors              the trained adapter
    train_report.json, loss_curve.png       the run's figures, and its loss curve as a picture
"""

from __future__ import annotations

from dataclasses import dataclass

from factory.io.storage import join

CHECKPOINTS = "checkpoints"  # Ray Train's run name: its storage is OUTPUT/<run id>/checkpoints/


@dataclass(frozen=True)
class TrainingLayout:
    root: str

    @property
    def spec(self) -> str:
        return join(self.root, "train_spec.json")

    @property
    def cache(self) -> str:
        return join(self.root, "cache")

    @property
    def latents(self) -> str:
        return join(self.cache, "latents")

    def latents_prefix(self, chunk: str) -> str:
        """Every latents part of one chunk starts with this."""
        return join(self.latents, f"part-{chunk}-")

    def latents_part(self, chunk: str, writer: str, sequence: int) -> str:
        return f"{self.latents_prefix(chunk)}{writer}-{sequence:04d}.parquet"

    @property
    def empty_caption(self) -> str:
        return join(self.cache, "empty_caption.parquet")

    @property
    def validation(self) -> str:
        return join(self.root, "validation")

    def validation_image(self, step: int | None, index: int) -> str:
        folder = "base" if step is None else f"step-{step:06d}"
        return join(self.validation, folder, f"{index:02d}.png")

    @property
    def validation_prompts(self) -> str:
        return join(self.validation, "prompts.json")

    def adapter(self, name: str) -> str:
        return join(self.root, "adapter", f"{name}.safetensors")

    @property
    def report(self) -> str:
        return join(self.root, "train_report.json")

    @property
    def loss_curve(self) -> str:
        return join(self.root, "loss_curve.png")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"
