"""Sample images while training: a fixed set of prompts through the factory's own generator, once with the base
model and then at each validation with the adapter as it stands, loaded through the safe loader like any tenant's
adapter. Same prompts, seeds and size every time, so the pictures of successive checkpoints compare.

The generator runs the profile without its speed options (no FP8, no compile): validation judges the adapter.
It is a second copy of the model beside the one being trained; for FLUX.1-dev that is ~33 GB more in bf16,
which is why `validation_every: 0` (base and final images only) is the default.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from PIL import Image

from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import load_adapter
from factory.model.performance import Performance
from factory.model.profiles import GeneratorProfile

log = structlog.get_logger(__name__)

VALIDATION_ADAPTER = "validation"


class Validator:
    def __init__(self, source: str | Path, profile: GeneratorProfile, prompts: list[str], *, width: int,
                 height: int, seed: int):
        self.source, self.profile = source, profile.model_copy(update={"performance": Performance()})
        self.params = [GenerationParams(prompt, seed + index, profile.steps, width, height, profile.guidance)
                       for index, prompt in enumerate(prompts)]
        self._generator: FluxGenerator | None = None

    @property
    def generator(self) -> FluxGenerator:
        if self._generator is None:  # loaded at the first validation, not at start-up
            self._generator = FluxGenerator.from_pretrained(self.source, self.profile)
        return self._generator

    def images(self, adapter_file: Path | None = None) -> list[Image.Image]:
        """One image per prompt: with the adapter file when given (checked and loaded by the safe loader, then
        removed again), else the base model's."""
        if not self.params:
            return []
        pipe = self.generator.pipe
        if adapter_file is None:
            return self.generator.generate(self.params)
        load_adapter(pipe, str(adapter_file), VALIDATION_ADAPTER)
        try:
            return self.generator.generate(self.params)
        finally:
            pipe.delete_adapters(VALIDATION_ADAPTER)
