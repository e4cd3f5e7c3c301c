"""One training run's state and its step: the profile's transformer with the LoRA, AdamW and diffusers' learning
rate schedule, the batch plan and the flow-matching objective; saved to and restored from a checkpoint folder.

This is the whole of the training arithmetic; it knows nothing of Ray. A Ray Train worker drives it (wrapping
the transformer in DDP), and so does the bare single-process loop the benchmark compares against. Whatever the
number of workers, step s trains on the same global batch with the same per-sample noise and sigma, and the
gradient is averaged over it: one worker or several follow the same curve, up to the order of float additions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from factory.model.generator import load_options
from factory.model.profiles import GeneratorProfile, resolve_dtype
from factory.model.training.adapter import add_lora, restore_lora, save_lora
from factory.model.training.cache import CachedSample
from factory.model.training.data import BatchPlan, seeded
from factory.model.training.flow import FlowMatching
from factory.model.training.options import TrainOptions

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

ADAPTER_FILE, STATE_FILE, PROGRESS_FILE = "adapter.safetensors", "trainer.pt", "progress.json"
HELD_OUT_DRAWS = 4  # fixed (noise, sigma) pairs per held-out image: a steadier figure than one
_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainingData:
    """The cached samples one run trains and validates on, and the empty caption's embeddings (caption dropout)."""

    train: list[CachedSample]
    held_out: list[CachedSample]
    empty_caption: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompt_embeds, pooled_embeds)


@dataclass
class Progress:
    """What a run has done so far; travels in every checkpoint, so a resumed run reports its whole history."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss of each step, over the global batch
    learning_rates: list[float] = field(default_factory=list)
    held_out: dict[int, float] = field(default_factory=dict)  # step -> held-out loss (step 0: the base model)
    seconds: float = 0.0  # in training steps (all attempts)
    saved_at: dict[int, float] = field(default_factory=dict)  # step -> wall clock of its checkpoint

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "losses": self.losses, "learning_rates": self.learning_rates,
                "held_out": {str(k): v for k, v in sorted(self.held_out.items())}, "seconds": self.seconds,
                "saved_at": {str(k): v for k, v in sorted(self.saved_at.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(step=data["step"], losses=list(data["losses"]), learning_rates=list(data["learning_rates"]),
                   held_out={int(k): float(v) for k, v in data["held_out"].items()}, seconds=data["seconds"],
                   saved_at={int(k): float(v) for k, v in data["saved_at"].items()})


def training_dtype(profile: GeneratorProfile, options: TrainOptions):
    return resolve_dtype(profile.dtype if options.precision == "profile" else options.precision)


def wants_gradient_checkpointing(profile: GeneratorProfile, options: TrainOptions) -> bool:
    """The option when set; else on for a profile that runs on a GPU (production sizes need it to fit one card at
    1024x1024) and off for a CPU profile (tiny), where it only costs time."""
    if options.gradient_checkpointing is not None:
        return options.gradient_checkpointing
    return profile.device != "cpu"


class TrainingSession:
    def __init__(self, transformer: Any, model: Any, scheduler: Any, data: TrainingData, options: TrainOptions,
                 guidance: float | None, *, dtype: torch.dtype, device: Any, rank: int = 0, world: int = 1):
        import torch
        from diffusers.optimization import get_scheduler

        if options.batch_size % world:
            raise ValueError(f"batch_size {options.batch_size} is not a multiple of {world} workers")
        self.transformer, self.model = transformer, model
        self.data, self.options, self.dtype, self.device = data, options, dtype, device
        self.rank, self.world = rank, world
        self.flow = FlowMatching(scheduler, options, guidance)
        self.plan = BatchPlan.of(data.train, options.batch_size, options.seed)
        self.parameters = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.learning_rate,
                                           weight_decay=options.weight_decay)
        self.lr_schedule = get_scheduler(_SCHEDULES[options.lr_schedule], self.optimizer,
                                         num_warmup_steps=options.warmup_steps, num_training_steps=options.steps)
        self.progress = Progress()

    @classmethod
    def load(cls, source: str | Path, profile: GeneratorProfile, options: TrainOptions, data: TrainingData, *,
             device: Any = "cpu", rank: int = 0, world: int = 1,
             wrap: Callable[[Any], Any] = lambda module: module) -> TrainingSession:
        """The profile's transformer (only it: the encoders' work is cached) with the LoRA added, on `device`,
        wrapped by `wrap` (DDP under Ray Train)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        dtype = training_dtype(profile, options)
        transformer = FluxTransformer2DModel.from_pretrained(
            str(source), subfolder="transformer", **load_options(profile) | {"dtype": dtype})
        add_lora(transformer, options)
        if wants_gradient_checkpointing(profile, options):
            transformer.enable_gradient_checkpointing()
        transformer.to(device)
        transformer.train()
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(source), subfolder="scheduler",
                                                                   revision=profile.revision)
        guidance = (options.guidance if options.guidance is not None else profile.guidance) \
            if transformer.config.guidance_embeds else None
        return cls(transformer, wrap(transformer), scheduler, data, options, guidance, dtype=dtype, device=device,
                   rank=rank, world=world)

    @property
    def step(self) -> int:
        return self.progress.step

    # ---- training -------------------------------------------------------------------------------------------

    def _inputs(self, samples: list[CachedSample], generators: list[torch.Generator], dropout: bool = True):
        """Batched tensors on the device: latents, caption embeddings (the empty caption's where dropped, when
        `dropout`), pooled embeddings, noise and sigmas, each sample's randomness from its own generator."""
        import torch

        draws = [self.flow.draw(tuple(s.latents.shape), g) for s, g in zip(samples, generators, strict=True)]
        empty = self.data.empty_caption
        prompts, pooled = [], []
        for sample, draw in zip(samples, draws, strict=True):
            use_empty = dropout and draw.drop_caption and empty is not None
            prompts.append(empty[0] if use_empty else sample.prompt_embeds)
            pooled.append(empty[1] if use_empty else sample.pooled_embeds)

        def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors).to(self.device)

        return (stack([s.latents for s in samples]), stack(prompts), stack(pooled),
                stack([d.noise for d in draws]), stack([d.sigma for d in draws]))

    def _autocast(self):
        import contextlib

        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.dtype)

    def train_step(self) -> float:
        """One optimizer step on this worker's share of the step's global batch; returns the loss averaged over
        the whole global batch (all workers)."""
        import torch

        started = time.perf_counter()
        step = self.progress.step
        batch = self.plan.global_batch(step)
        share = self.options.batch_size // self.world
        places = range(self.rank * share, (self.rank + 1) * share)
        samples = [self.data.train[batch[place]] for place in places]
        inputs = self._inputs(samples, [seeded(self.options.seed, "step", step, place) for place in places])
        with self._autocast():
            loss = self.flow.losses(self.model, *inputs, dtype=self.dtype).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.options.max_grad_norm)
        learning_rate = self.lr_schedule.get_last_lr()[0]
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = _global_mean(loss.detach().float(), self.world)
        self.progress.step = step + 1
        self.progress.losses.append(mean)
        self.progress.learning_rates.append(learning_rate)
        self.progress.seconds += time.perf_counter() - started
        return mean

    def held_out_loss(self) -> float | None:
        """The flow-matching loss on the held-out images with fixed noise and sigma per image (the same at every
        validation), on the bare transformer: only the worker that validates calls it."""
        import torch

        held = self.data.held_out
        if not held:
            return None
        total, count = 0.0, 0
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            with torch.no_grad(), self._autocast():
                for sample in held:
                    generators = [seeded(self.options.seed, "held-out", sample.id, d) for d in range(HELD_OUT_DRAWS)]
                    latents, prompts, pooled, noise, sigmas = self._inputs([sample] * HELD_OUT_DRAWS, generators,
                                                                               dropout=False)
                    losses = self.flow.losses(self.transformer, latents, prompts, pooled, noise, sigmas,
                                              dtype=self.dtype)
                    total, count = total + float(losses.sum()), count + len(losses)
        finally:
            self.transformer.train(was_training)
        value = total / count
        self.progress.held_out[self.progress.step] = value
        return value

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def save(self, folder: Path, metadata: dict[str, str]) -> Path:
        """The adapter as it stands (the factory's adapter format, `metadata` in its header), the optimizer's and
        schedule's state and the progress, into `folder`; returns the adapter file."""
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        self.progress.saved_at[self.progress.step] = time.time()
        adapter = save_lora(self.transformer, self.options, folder / ADAPTER_FILE, metadata)
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()},
                   folder / STATE_FILE)
        (folder / PROGRESS_FILE).write_text(json.dumps(self.progress.as_json(), sort_keys=True))
        return adapter

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint `save` wrote: the same weights, optimizer moments, schedule and step, so the
        rest of the run is what it would have been."""
        import torch

        restore_lora(self.transformer, folder / ADAPTER_FILE)
        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.progress = Progress.from_json(json.loads((folder / PROGRESS_FILE).read_text()))
        log.info("training resumed", step=self.progress.step)


def _global_mean(value: torch.Tensor, world: int) -> float:
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / world
    return float(value)
