"""Captions and visual question answering with any `AutoModelForImageTextToText` checkpoint.

One wrapper for every profile: the processor's chat template formats the turn, so a LLaVA-style tiny model
and a production Qwen2.5-VL go down the same path.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog
from PIL import Image

from factory.io.images import fit_pixels
from factory.model.profiles import VLMProfile, resolve_device, resolve_dtype

log = structlog.get_logger(__name__)


AUTO_MODEL_CLASS = "AutoModelForImageTextToText"


def load_options(profile: VLMProfile) -> dict:
    """Keyword arguments for `AutoModelForImageTextToText.from_pretrained`, for every profile."""
    return {"revision": profile.revision, "dtype": resolve_dtype(profile.dtype), "use_safetensors": True}


def bound_processor_pixels(processor, max_pixels: int | None) -> bool:
    """Give the processor the profile's pixel bound where it takes one: Qwen2-VL-style image processors bound
    an image's pixels by `size["longest_edge"]` (what their `max_pixels` argument sets), so their own rounding to
    the patch grid stays within it. True if it took it. Every image is resized to the bound before any
    processor sees it (`_chat`), whatever this returns."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if max_pixels is None or image_processor is None or getattr(image_processor, "merge_size", None) is None:
        return False
    if isinstance(size, dict) and "longest_edge" in size:
        image_processor.size = {**size, "longest_edge": max_pixels}
    elif hasattr(size, "longest_edge"):
        size.longest_edge = max_pixels
    else:
        return False
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = max_pixels
    return True


class VisionLanguageModel:
    def __init__(self, model, processor, profile: VLMProfile):
        self.model = model
        self.processor = processor
        self.profile = profile
        self.device = resolve_device(profile.device)

    @classmethod
    def from_pretrained(cls, source: str | Path, profile: VLMProfile) -> VisionLanguageModel:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        started = time.perf_counter()
        device = resolve_device(profile.device)
        processor = AutoProcessor.from_pretrained(str(source), revision=profile.revision)
        # Batched generation with a decoder-only model needs padding on the left.
        processor.tokenizer.padding_side = "left"
        bound_processor_pixels(processor, profile.max_pixels)
        model = AutoModelForImageTextToText.from_pretrained(str(source), **load_options(profile)).to(device).eval()
        log.info("vlm loaded", source=str(source), seconds=round(time.perf_counter() - started, 2))
        return cls(model, processor, profile)

    def caption(self, images: list[Image.Image], instructions: list[str | None] | None = None) -> list[str]:
        """One caption per image; `instructions` may refine the default caption prompt per image."""
        instructions = instructions or [None] * len(images)
        prompts = [text or self.profile.caption_prompt for text in instructions]
        return self._chat(images, prompts)

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        return self._chat(images, questions)

    def next_token_logits(self, images: list[Image.Image], texts: list[str]):
        """The logits of the first token the model would answer each (image, text) with: one forward pass, what a
        health check runs to see that the model gives numbers."""
        import torch

        with torch.inference_mode():
            return self.model(**self._inputs(images, texts)).logits[:, -1]

    def _chat(self, images: list[Image.Image], texts: list[str]) -> list[str]:
        import torch

        if not images:
            return []
        inputs = self._inputs(images, texts)
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, max_new_tokens=self.profile.max_new_tokens, do_sample=False
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        texts_out = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts_out]

    def _inputs(self, images: list[Image.Image], texts: list[str]):
        """The model's inputs for a batch of (image, text) turns, on its device."""
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}] for text in texts
        ]
        rendered = [
            self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            for turn in conversations
        ]
        if self.profile.max_pixels is not None:
            # A no-op for images already within the budget (archive jobs resize in their workers).
            images = [fit_pixels(image, self.profile.max_pixels) for image in images]
        inputs = self.processor(images=images, text=rendered, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs
