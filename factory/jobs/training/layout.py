"""Where a training run's objects live under OUTPUT/<run id>/ (a local folder or an s3:// prefix).

    train_spec.json                         the spec the run started with (a resumed run must match it)
    cache/dataset.json                      written last by stage 1: its shard folder, counts, data digest
    cache/<attempt>/*.parquet               VAE latents and caption embeddings, one row per image (Ray Data)
    cache/empty_caption.parquet             the empty caption's embeddings (caption dropout only)
    rejects/part-<unit>.parquet             images and captions that could not be used, with the reason
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
    def cache_manifest(self) -> str:
        return join(self.cache, "dataset.json")

    def cache_attempt(self, attempt: str) -> str:
        return join(self.cache, attempt)

    @property
    def empty_caption(self) -> str:
        return join(self.cache, "empty_caption.parquet")

    @property
    def rejects(self) -> str:
        return join(self.root, "rejects")

    def reject_part(self, unit: str) -> str:
        return join(self.rejects, f"part-{unit}.parquet")

    def validation_image(self, step: int | None, index: int) -> str:
        folder = "base" if step is None else f"step-{step:06d}"
        return join(self.root, "validation", folder, f"{index:02d}.png")

    @property
    def validation_prompts(self) -> str:
        return join(self.root, "validation", "prompts.json")

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
