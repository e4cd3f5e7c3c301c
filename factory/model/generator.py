"""Images from a diffusers FLUX pipeline: text-to-image and edits, one pipeline call per group of compatible rows.

A FLUX.1 profile generates with `FluxPipeline` and edits with `FluxKontextPipeline` built on the same components
(the same modules, no second copy of any weights), or on a second transformer beside them when the profile names
one (FLUX.1 Kontext [dev] beside FLUX.1 [dev]); a FLUX.2 profile does both with one `Flux2KleinPipeline`.

Batching edits: `FluxKontextPipeline` takes one reference per prompt, so rows with different references whose
references and outputs have the same sizes share a call. `Flux2KleinPipeline` conditions every prompt of a call on
the same reference list, so only rows with the same references (same pixels) share a call; the others run one call
per row.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, TypeVar

import structlog
from PIL import Image

from factory.errors import ModelError
from factory.model import speed
from factory.model.profiles import GeneratorProfile, ModelSource, resolve_device, resolve_dtype

log = structlog.get_logger(__name__)

T = TypeVar("T")

# diffusers classes by profile family (edits: FluxKontextPipeline on FLUX.1's components, FLUX.2's own pipeline).
PIPELINE_CLASSES = {"flux1": "FluxPipeline", "flux2": "Flux2KleinPipeline"}
TRANSFORMER_CLASSES = {"flux1": "FluxTransformer2DModel", "flux2": "Flux2Transformer2DModel"}
# Both FLUX VAEs downsample 8x and the transformers read 2x2 latent patches: sides are multiples of 16.
SIDE_MULTIPLE = 16
MAX_SIDE = 2048


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


@dataclass(frozen=True)
class EditParams:
    """One edit: an instruction and its reference images, already decoded and size-checked by the caller. Without
    `width`/`height` the output keeps the first reference's aspect ratio within the profile's default pixels."""

    prompt: str
    references: tuple[Image.Image, ...]
    seed: int
    steps: int
    guidance: float
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class ResolvedEdit:
    """An edit as a pipeline call takes it: output size decided, references resized to what is encoded."""

    params: EditParams
    width: int
    height: int
    references: tuple[Image.Image, ...]
    call_key: Hashable  # edits with equal keys can share one pipeline call


def fit_size(width: int, height: int, pixels: int, multiple: int = SIDE_MULTIPLE,
             max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The size closest to `width`:`height`'s aspect ratio with at most `pixels` pixels (when that allows a side of
    `multiple` at all), both sides multiples of `multiple` and at most `max_side`."""
    aspect = width / height
    wide, tall = math.sqrt(pixels * aspect), math.sqrt(pixels / aspect)
    if max(wide, tall) > max_side:  # the longer side capped, the shorter follows it, so the aspect holds
        wide, tall = (max_side, max_side / aspect) if wide >= tall else (max_side * aspect, max_side)

    def side(value: float) -> int:
        return min(max_side, max(multiple, round(value / multiple) * multiple))

    fitted = (side(wide), side(tall))
    while fitted[0] * fitted[1] > pixels and max(fitted) > multiple:
        # Shrink whichever side keeps the aspect ratio closest to the original.
        smaller = [(w, h) for w, h in ((fitted[0] - multiple, fitted[1]), (fitted[0], fitted[1] - multiple))
                   if w >= multiple and h >= multiple]
        fitted = min(smaller, key=lambda size: abs(math.log(size[0] / size[1] / aspect)))
    return fitted


def load_options(profile: GeneratorProfile) -> dict:
    """Keyword arguments for the pipeline's `from_pretrained`, the same for tiny and production profiles."""
    # safetensors only: a pickle checkpoint is never loaded, whatever the source holds.
    return {"revision": profile.revision, "dtype": resolve_dtype(profile.dtype), "use_safetensors": True}


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def kontext_pipe(pipe, transformer=None):
    """A FluxKontextPipeline on `pipe`'s components (the same module objects), with `transformer` instead of
    pipe's when given. Built from the components rather than with `from_pipe`, which casts every shared module to
    float32 unless told the dtype, and would touch FP8-quantized layers."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # per-call state stays per pipeline
    return _diffusers_class("FluxKontextPipeline")(
        scheduler=scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
        transformer=transformer if transformer is not None else pipe.transformer,
    )


def _in_groups(items: Sequence[T], key: Callable[[T], Any], run: Callable[[list[T]], list]) -> list:
    """`run` once per group of items with equal keys; its outputs back in the items' order."""
    out: list = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    for _, members in groupby(order, key=lambda i: key(items[i])):
        indices = list(members)
        for index, produced in zip(indices, run([items[i] for i in indices]), strict=True):
            out[index] = produced
    return out


def _pixels_digest(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


class FluxGenerator:
    """Holds the text-to-image pipeline (loaded with `from_pretrained`) and, for a profile that edits, the edit
    pipeline on the same components; batches rows into single pipeline calls.

    The profile's `performance` options are applied at load (`speed.prepare`, to every transformer), except
    compiling: a replica calls `compile()` once its LoRA pool is ready for hot-swap, then `warm_up()` before it
    reports ready.
    """

    def __init__(self, pipe, profile: GeneratorProfile, edit_pipe=None):
        self.pipe = pipe
        self.edit_pipe = edit_pipe
        self.profile = profile
        self.performance = profile.performance
        self.device = resolve_device(profile.device)
        self.compile_seconds = 0.0
        self.compiled = False
        self.warmup_seconds = 0.0
        self._graphs_after_warmup: int | None = None
        self._magcache_steps: dict[int, int | None] = {}  # per transformer (id): the step count MagCache is armed for
        # diffusers' progress bar floods replica logs; progress is reported by the job instead.
        for each in self.pipes:
            each.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, source: str | Path, profile: GeneratorProfile,
                        edit_transformer: ModelSource | None = None) -> FluxGenerator:
        """Load the pipeline; with `edit_transformer`, also that checkpoint's `transformer/` for edits, beside it."""
        device = resolve_device(profile.device)
        speed.check_device(profile.performance, device)  # before minutes of loading, not after
        if edit_transformer is not None and profile.cpu_offload != "none":
            raise ModelError("cpu_offload: not available with a separate edit transformer (offload hooks would "
                             "move the shared text encoders and VAE for two pipelines)")
        started = time.perf_counter()
        pipe = _diffusers_class(PIPELINE_CLASSES[profile.family]).from_pretrained(str(source), **load_options(profile))
        edit_pipe = None
        if edit_transformer is not None:
            transformer = type(pipe.transformer).from_pretrained(
                edit_transformer.source, subfolder="transformer",
                **load_options(profile) | {"revision": edit_transformer.revision},
            )
            edit_pipe = kontext_pipe(pipe, transformer.to(device))
        if profile.cpu_offload == "model" and device == "cuda":
            pipe.enable_model_cpu_offload()
        elif profile.cpu_offload == "sequential" and device == "cuda":
            pipe.enable_sequential_cpu_offload()
        else:
            pipe.to(device)
        generator = cls.from_pipe(pipe, profile, edit_pipe=edit_pipe)
        log.info("generator loaded", source=str(source), seconds=round(time.perf_counter() - started, 2),
                 performance=profile.performance.tag(), edits=generator.edit_pipe is not None,
                 edit_transformer=edit_transformer.source if edit_transformer is not None else None)
        return generator

    @classmethod
    def from_pipe(cls, pipe, profile: GeneratorProfile, edit_pipe=None) -> FluxGenerator:
        """A generator around a pipeline already on its device (loaded, or built in memory by a benchmark), with the
        profile's speed options applied except compiling. For a profile that edits, `edit_pipe` defaults to the
        family's edit pipeline on `pipe`'s components."""
        device = resolve_device(profile.device)
        if edit_pipe is None and profile.edit is not None:
            edit_pipe = pipe if profile.family == "flux2" else kontext_pipe(pipe)
        speed.prepare(pipe, profile.performance, device)
        if edit_pipe is not None and edit_pipe.transformer is not pipe.transformer:
            speed.prepare_transformer(edit_pipe.transformer, profile.performance)
        return cls(pipe, profile, edit_pipe)

    @property
    def pipes(self) -> list:
        """The distinct pipelines: text-to-image, then edits when that is another pipeline object."""
        return [self.pipe] + ([self.edit_pipe] if self.edit_pipe not in (None, self.pipe) else [])

    @property
    def transformers(self) -> list:
        """The distinct transformers (two for FLUX.1 [dev] with Kontext [dev]); speed options apply to each."""
        found = [self.pipe.transformer]
        if self.edit_pipe is not None and self.edit_pipe.transformer is not self.pipe.transformer:
            found.append(self.edit_pipe.transformer)
        return found

    @property
    def lora_mirrors(self) -> list:
        """Pipelines whose own transformer must carry the same adapters as `pipe`'s: the edit pipeline when it runs a
        transformer of its own. A LoRA pool loads every adapter into these too."""
        return [self.edit_pipe] if len(self.transformers) > 1 else []

    @property
    def performance_tag(self) -> str:
        """How this generator makes images now: the profile's options, less compile until `compile()` ran (the
        CLI's single rows run eager)."""
        if self.performance.compile != "off" and not self.compiled:
            return self.performance.model_copy(update={"compile": "off"}).tag()
        return self.performance.tag()

    def compile(self) -> None:
        """Compile every transformer as the profile says (no-op when compile is off). Call after the LoRA pool
        has enabled hot-swap and loaded its first adapter: both change the modules the graph is traced from."""
        if self.compiled:
            return
        for transformer in self.transformers:
            self.compile_seconds += speed.compile_transformer(transformer, self.performance)
        self.compiled = self.performance.compile != "off"

    def warm_up(self, batch_sizes: list[int]) -> float:
        """Run every warm-up shape at each batch size (compiling them when compile is on); returns seconds.
        Batch sizes 1 and 2 matter with compile: size 1 is specialised, and the second size makes torch
        mark the batch dimension dynamic, so every larger batch reuses that graph. An edit shape runs with the
        same (gray) references on every row, the batch a FLUX.2 pipeline can share."""
        started = time.perf_counter()
        for shape in self.performance.warmup:
            for size in sorted(set(batch_sizes)):
                if shape.references:
                    if self.edit_pipe is None:
                        raise ModelError("performance.warmup: an edit shape on a generator that cannot edit")
                    gray = Image.new("RGB", (shape.width, shape.height), (128, 128, 128))
                    self.edit([EditParams("warm-up", (gray,) * shape.references, seed, shape.steps,
                                          self.edit_guidance, shape.width, shape.height) for seed in range(size)])
                else:
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

    # ---- text-to-image -----------------------------------------------------------------------------------

    def generate(self, params: list[GenerationParams]) -> list[Image.Image]:
        """Images in the order of `params`. Each image depends only on its own params, never on neighbours:
        every row gets its own seeded torch.Generator, which diffusers uses for that row's latents."""
        return _in_groups(params, lambda p: p.call_shape,
                          lambda group: self.call_pipeline(group, group[0].call_shape, output_type="pil").images)

    def call_pipeline(self, params: list[GenerationParams], shape: tuple[int, int, int, float],
                      output_type: str = "pil"):
        """One pipeline call for params that share `shape`; `output_type="latent"` gives the final latents."""
        steps, width, height, guidance = shape
        self._configure(self.pipe, width, height, steps)
        return self.pipe(
            prompt=[p.prompt for p in params], num_inference_steps=steps, width=width, height=height,
            guidance_scale=guidance, generator=self._seeded(p.seed for p in params), output_type=output_type,
            **self._text_options(),
        )

    # ---- edits -----------------------------------------------------------------------------------------

    @property
    def edit_guidance(self) -> float:
        """Guidance of an edit row that names none."""
        edit = self.profile.edit
        return edit.guidance if edit is not None and edit.guidance is not None else self.profile.guidance

    def edit(self, params: list[EditParams]) -> list[Image.Image]:
        """Edited images in the order of `params`, each depending only on its own params (seed, instruction,
        references), never on its neighbours'."""
        resolved = self.resolve_edits(params)
        return _in_groups(resolved, lambda r: r.call_key,
                          lambda group: self.call_edit_pipeline(group, output_type="pil").images)

    def resolve_edits(self, params: list[EditParams]) -> list[ResolvedEdit]:
        """Each edit's output size (given, or the first reference's aspect ratio within the profile's default
        pixels) and references resized to the profile's reference pixels."""
        edit = self.profile.edit
        if self.edit_pipe is None or edit is None:
            raise ModelError(f"generator {self.profile.source}: this profile cannot edit")
        resolved = []
        for p in params:
            if not p.references or len(p.references) > edit.max_references:
                raise ModelError(f"an edit takes 1 to {edit.max_references} references here, got {len(p.references)}")
            if p.width is not None and p.height is not None:
                width, height = p.width, p.height
            else:
                width, height = fit_size(*p.references[0].size, self.profile.width * self.profile.height)
            references = tuple(self._fit_reference(image, edit.reference_pixels) for image in p.references)
            common = (p.steps, width, height, p.guidance)
            if self.profile.family == "flux2":  # one reference list per call
                key = common + tuple(_pixels_digest(image) for image in references)
            else:  # one reference per prompt: equal sizes batch
                key = common + tuple(image.size for image in references)
            resolved.append(ResolvedEdit(p, width, height, references, key))
        return resolved

    def call_edit_pipeline(self, edits: list[ResolvedEdit], output_type: str = "pil"):
        """One edit-pipeline call for edits that share a `call_key`."""
        first = edits[0]
        if any(e.call_key != first.call_key for e in edits):
            raise ValueError("edits of one pipeline call must share their call_key")
        width, height, steps = first.width, first.height, first.params.steps
        self._configure(self.edit_pipe, width, height, steps)
        if self.profile.family == "flux2":
            # The pipeline conditions every prompt on the whole list: the group's shared references.
            images: list[Image.Image] = list(first.references)
            extra: dict[str, Any] = {}
        else:
            images = [e.references[0] for e in edits]
            # The references are sized already (resolve_edits); max_area keeps the pipeline at the output size.
            extra = {"max_area": width * height, "_auto_resize": False}
        return self.edit_pipe(
            image=images, prompt=[e.params.prompt for e in edits], num_inference_steps=steps, width=width,
            height=height, guidance_scale=first.params.guidance, generator=self._seeded(e.params.seed for e in edits),
            output_type=output_type, **self._text_options(), **extra,
        )

    # ---- shared ------------------------------------------------------------------------------------------

    @staticmethod
    def _fit_reference(image: Image.Image, pixels: int) -> Image.Image:
        size = fit_size(*image.size, pixels)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    @staticmethod
    def _seeded(seeds) -> list:
        import torch

        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    def _text_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_sequence_length": self.profile.max_sequence_length}
        if self.profile.text_encoder_layers is not None:
            options["text_encoder_out_layers"] = self.profile.text_encoder_layers
        return options

    def _configure(self, pipe, width: int, height: int, steps: int) -> None:
        key = id(pipe.transformer)
        self._magcache_steps[key] = speed.configure_call(pipe, self.performance, width, height, steps,
                                                         self._magcache_steps.get(key))
