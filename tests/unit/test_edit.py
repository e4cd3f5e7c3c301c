"""Edits on the real tiny models: `tiny` edits with FluxKontextPipeline on its FLUX.1 modules, `tiny-flux2` with a
Flux2KleinPipeline of the real classes built offline. The output depends on the reference and the seed, and on
nothing else; FLUX.2 takes several references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.model.generator import EditParams, fit_size
from factory.model.stack import ModelStack, resolve_sources
from factory.model.tiny import BUILDER_VERSION, FLUX2_BUILDER_VERSION, build_flux2, tree_digest
from factory.routing.executor import encode_png

PROMPT = "put the product on a beach at sunset"


@pytest.fixture(scope="module")
def flux2(tiny_path) -> ModelStack:
    return ModelStack.from_profile("tiny-flux2")


@pytest.fixture(scope="module")
def photos(sample_images) -> dict[str, Image.Image]:
    return {name: Image.open(path).convert("RGB") for name, path in sample_images.items()}


def edit(stack: ModelStack, *references: Image.Image, seed: int = 3, prompt: str = PROMPT, **size) -> Image.Image:
    (image,) = stack.edit([params(stack, references, seed, prompt, **size)])
    return image


def params(stack: ModelStack, references, seed: int = 3, prompt: str = PROMPT, **size) -> EditParams:
    return EditParams(prompt, tuple(references), seed, 2, stack.generator.edit_guidance, **size)


def test_tiny_edits_with_kontext_on_the_same_modules(stack):
    generator = stack.generator
    assert type(generator.pipe).__name__ == "FluxPipeline"
    assert type(generator.edit_pipe).__name__ == "FluxKontextPipeline"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert getattr(generator.edit_pipe, name) is getattr(generator.pipe, name), name  # no second copy
    assert generator.transformers == [generator.pipe.transformer] and generator.lora_mirrors == []


def test_tiny_flux2_is_a_klein_pipeline_of_the_real_classes_built_deterministically(flux2, tmp_path):
    pipe = flux2.generator.pipe
    assert flux2.generator.edit_pipe is pipe
    assert [type(getattr(pipe, name)).__name__ for name in ("transformer", "vae", "text_encoder", "tokenizer")] == [
        "Flux2Transformer2DModel", "AutoencoderKLFlux2", "Qwen3ForCausalLM", "Qwen2Tokenizer"]
    assert pipe.config.is_distilled and pipe.vae_scale_factor == 8 and tuple(pipe.vae.config.patch_size) == (2, 2)
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.transformer._repeated_blocks == ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]
    assert flux2.model_version == f"tiny-flux2-v{FLUX2_BUILDER_VERSION}+tiny-v{BUILDER_VERSION}"
    built = tmp_path / "again"
    build_flux2(built)
    assert tree_digest(built) == tree_digest(Path(resolve_sources(flux2.profile)[0]))  # same files, bit for bit
    assert sum(p.stat().st_size for p in built.rglob("*") if p.is_file()) < 2_000_000


@pytest.mark.parametrize("profile", ["tiny", "tiny-flux2"])
def test_same_reference_and_seed_same_bytes_other_reference_other_image(profile, request, photos):
    stack = request.getfixturevalue("stack" if profile == "tiny" else "flux2")
    small = {"width": 64, "height": 64}
    first = edit(stack, photos["chelsea"], **small)
    assert encode_png(first) == encode_png(edit(stack, photos["chelsea"], **small))
    assert encode_png(first) != encode_png(edit(stack, photos["coffee"], **small))  # it depends on the reference
    assert encode_png(first) != encode_png(edit(stack, photos["chelsea"], seed=4, **small))
    # No size given: the first reference's aspect ratio within the profile's default 256x256 pixels.
    assert edit(stack, photos["chelsea"]).size == fit_size(*photos["chelsea"].size, 256 * 256) == (304, 208)


def test_several_references_on_tiny_flux2(flux2, photos):
    one = edit(flux2, photos["chelsea"])
    three = edit(flux2, photos["chelsea"], photos["coffee"], photos["astronaut"])
    swapped = edit(flux2, photos["astronaut"], photos["coffee"], photos["chelsea"])
    assert encode_png(three) == encode_png(edit(flux2, photos["chelsea"], photos["coffee"], photos["astronaut"]))
    assert encode_png(three) != encode_png(one)  # every reference counts
    assert three.size == one.size and swapped.size == (256, 256)  # the first reference sets the aspect ratio


def count_calls(generator, monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = generator.call_edit_pipeline

    def counted(edits, output_type="pil"):
        sizes.append(len(edits))
        return original(edits, output_type)

    monkeypatch.setattr(generator, "call_edit_pipeline", counted)
    return sizes


def test_kontext_batches_different_references_and_flux2_only_shared_ones(stack, flux2, photos, monkeypatch):
    cat, coffee = photos["chelsea"], photos["coffee"].resize(photos["chelsea"].size)
    rows = [(cat,), (coffee,), (cat,)]

    kontext_calls = count_calls(stack.generator, monkeypatch)
    stack.edit([params(stack, refs, seed=i, width=64, height=64) for i, refs in enumerate(rows)])
    assert kontext_calls == [3]  # one reference per prompt: equal sizes share a call

    klein_calls = count_calls(flux2.generator, monkeypatch)
    batch = flux2.edit([params(flux2, refs, seed=5, width=64, height=64) for refs in rows])
    # One reference list per call: the two rows on the same photo share one, the other runs alone.
    assert sorted(klein_calls) == [1, 2]
    alone = flux2.edit([params(flux2, (coffee,), seed=5, width=64, height=64)])
    assert encode_png(batch[1]) == encode_png(alone[0])  # a row never depends on its neighbours
    assert np.array_equal(np.asarray(batch[0]), np.asarray(batch[2]))
