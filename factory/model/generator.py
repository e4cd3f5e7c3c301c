"""Text-to-image with a diffusers FluxPipeline: one pipeline call per group of compatible requests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import structlog
from PIL import Image

from factory.model import speed
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
    """Holds a FluxPipeline loaded with `from_pretrained`; batches prompts into single pipeline calls.

    The profile's `performance` options are applied at load (`speed.prepare`), except compiling: a replica
    calls `compile()` once its LoRA pool is ready for hot-swap, then `warm_up()` before it reports ready.
    """

    def __init__(self, pipe, profile: GeneratorProfile):
        self.pipe = pipe
        self.profile = profile
        self.performance = profile.performance
        self.device = resolve_device(profile.device)
        self.compile_seconds = 0.0
        self.compiled = False
        self.warmup_seconds = 0.0
        self._graphs_after_warmup: int | None = None
        self._magcache_steps: int | None = None
        # diffusers' progress bar floods replica logs; progress is reported by the job instead.
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, source: str | Path, profile: GeneratorProfile) -> FluxGenerator:
        from diffusers import FluxPipeline

        device = resolve_device(profile.device)
        speed.check_device(profile.performance, device)  # before minutes of loading, not after
        started = time.perf_counter()
        pipe = FluxPipeline.from_pretrained(str(source), **load_options(profile))
        if profile.cpu_offload == "model" and device == "cuda":
            pipe.enable_model_cpu_offload()
        elif profile.cpu_offload == "sequential" and device == "cuda":
            pipe.enable_sequential_cpu_offload()
        else:
            pipe.to(device)
        generator = cls.from_pipe(pipe, profile)
        log.info("generator loaded", source=str(source), seconds=round(time.perf_counter() - started, 2),
                 performance=profile.performance.tag())
        return generator

    @classmethod
    def from_pipe(cls, pipe, profile: GeneratorProfile) -> FluxGenerator:
        """A generator around a pipeline already on its device (loaded, or built in memory by a benchmark),
        with the profile's speed options applied except compiling."""
        speed.prepare(pipe, profile.performance, resolve_device(profile.device))
        return cls(pipe, profile)

    @property
    def performance_tag(self) -> str:
        """How this generator makes images now: the profile's options, less compile until `compile()` ran (the
        CLI's single rows run eager)."""
        if self.performance.compile != "off" and not self.compiled:
            return self.performance.model_copy(update={"compile": "off"}).tag()
        return self.performance.tag()

    def compile(self) -> None:
        """Compile the transformer as the profile says (no-op when compile is off). Call after the LoRA pool
        has enabled hot-swap and loaded its first adapter: both change the modules the graph is traced from."""
        if self.compiled:
            return
        self.compile_seconds += speed.compile_transformer(self.pipe, self.performance)
        self.compiled = self.performance.compile != "off"

    def warm_up(self, batch_sizes: list[int]) -> float:
        """Run every warm-up shape at each batch size (compiling them when compile is on); returns seconds.
        Batch sizes 1 and 2 matter with compile: size 1 is specialised, and the second size makes torch
        mark the batch dimension dynamic, so every larger batch reuses that graph."""
        started = time.perf_counter()
        for shape in self.performance.warmup:
            for size in sorted(set(batch_sizes)):
                self.generate([GenerationParams("warm-up", seed, shape.steps, shape.width, shape.height,
                                                self.profile.guidance) for seed in range(size)])
        seconds = time.perf_counter() - started
        self.warmup_seconds += seconds
        if self.compiled:
            self._graphs_after_warmup = speed.compiled_graphs()
        log.info("generator warmed up", seconds=round(seconds, 2), shapes=len(self.performance.warmup),
                 batch_sizes=sorted(set(batch_sizes)))
        return seconds

    def compile_stats(self) -> dict:
        """What a replica reports: compile mode, graphs compiled, and recompiles since warm-up (0 is the aim)."""
        compiled = self.compiled
        graphs = speed.compiled_graphs() if compiled else 0
        after = self._graphs_after_warmup
        return {
            "compile": self.performance.compile if compiled else "off", "performance": self.performance_tag, "graphs": graphs,
            "recompiles_after_warmup": (graphs - after) if compiled and after is not None else None,
            "compile_seconds": round(self.compile_seconds, 3), "warmup_seconds": round(self.warmup_seconds, 3),
        }

    def generate(self, params: list[GenerationParams]) -> list[Image.Image]:
        """Images in the order of `params`. Each image depends only on its own params, never on neighbours:
        every row gets its own seeded torch.Generator, which diffusers uses for that row's latents."""
        images: list[Image.Image | None] = [None] * len(params)
        order = sorted(range(len(params)), key=lambda i: params[i].call_shape)
        for shape, members in groupby(order, key=lambda i: params[i].call_shape):
            indices = list(members)
            output = self.call_pipeline([params[i] for i in indices], shape, output_type="pil")
            for index, image in zip(indices, output.images, strict=True):
                images[index] = image
        return images  # type: ignore[return-value]

    def call_pipeline(self, params: list[GenerationParams], shape: tuple[int, int, int, float],
                      output_type: str = "pil"):
        """One pipeline call for params that share `shape`; `output_type="latent"` gives the final latents."""
        import torch

        steps, width, height, guidance = shape
        self._magcache_steps = speed.configure_call(self.pipe, self.performance, width, height, steps,
                                                    self._magcache_steps)
        generators = [torch.Generator("cpu").manual_seed(p.seed) for p in params]
        return self.pipe(
            prompt=[p.prompt for p in params], num_inference_steps=steps, width=width, height=height,
            guidance_scale=guidance, generator=generators, max_sequence_length=self.profile.max_sequence_length,
            output_type=output_type,
        )
