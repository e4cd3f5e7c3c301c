"""LoRA adapters on FLUX.2 (`tiny-flux2`) and on a profile whose edits run on a second transformer: the safe
loader's checks refuse an adapter made for another architecture with the layer and the reason, FLUX.2 adapters
change images (hot-swapped exactly as loaded), and a mirrored pool styles edits on the second transformer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.model.generator import EditParams, FluxGenerator, GenerationParams
from factory.model.lora import AdapterError, LoraPool, create_lora, create_lora_for_profile, load_adapter
from factory.model.lora.ref import AdapterRef
from factory.model.lora.safe_load import loaded_adapter_names, prepare_adapter, read_adapter
from factory.model.profiles import ModelSource, get_profile
from factory.model.stack import ModelStack
from factory.model.tiny import build_flux

ROW = [GenerationParams("a red bicycle", 5, 2, 64, 64, 1.0)]


def image(generator) -> np.ndarray:
    return np.asarray(generator.generate(ROW)[0]).astype(int)


@pytest.fixture(scope="module")
def flux2(tiny_path) -> ModelStack:
    return ModelStack.from_profile("tiny-flux2")


@pytest.fixture(scope="module")
def klein_adapter(flux2, tmp_path_factory) -> Path:
    return create_lora_for_profile(tmp_path_factory.mktemp("klein") / "klein.safetensors", "tiny-flux2", rank=4,
                                   alpha=8, seed=1)


def test_flux1_adapters_are_refused_naming_the_layer_they_lack_or_misfit(flux2, stack, tmp_path):
    whole = create_lora_for_profile(tmp_path / "flux1.safetensors", "tiny", rank=4, seed=1)
    with pytest.raises(AdapterError) as missing:
        prepare_adapter(read_adapter(str(whole)), flux2.generator.pipe)
    assert "targets transformer.single_transformer_blocks.0.attn.to_k, which this model (Flux2Transformer2DModel) " \
           "does not have" in str(missing.value)
    # Layers both architectures have, at FLUX.1's width: refused on the shape.
    added_q = create_lora(tmp_path / "q.safetensors", transformer=stack.generator.pipe.transformer, rank=4,
                          target_modules=["add_q_proj"])
    with pytest.raises(AdapterError) as misfit:
        load_adapter(flux2.generator.pipe, str(added_q), "q")
    assert "transformer.transformer_blocks.0.attn.add_q_proj is 64->64 in the adapter but 32->32 in the model " \
           "(made for another base model?)" in str(misfit.value)
    assert loaded_adapter_names(flux2.generator.pipe) == set()  # nothing was loaded


def test_a_flux2_adapter_changes_the_image_and_disabling_it_restores_the_base(flux2, klein_adapter):
    generator = flux2.generator
    assert any(".to_qkv_mlp_proj." in key for key in read_adapter(str(klein_adapter)).tensors)  # single blocks too
    base = image(generator)
    pool = LoraPool(generator.pipe)
    with pool.use(AdapterRef(key="acme/klein", uri=str(klein_adapter))):
        styled = image(generator)
    with pool.use(None):
        again = image(generator)
    assert np.abs(styled - base).max() > 0 and np.array_equal(again, base)
    pool.clear()


def test_hot_swapped_flux2_adapters_give_what_a_plain_load_gives(tiny_path, klein_adapter, tmp_path):
    # FLUX.2's loader takes no alphas from a dict: the pool folds alpha / rank into B. Alpha 8 over rank 4 here, in
    # a slot padded to rank 8: any error in the fold or the padding shows as a different image from the one
    # diffusers makes when it loads the file itself (reading alpha from the file's header).
    plain, swapped = ModelStack.from_profile("tiny-flux2").generator, ModelStack.from_profile("tiny-flux2").generator
    other = create_lora_for_profile(tmp_path / "other.safetensors", "tiny-flux2", rank=8, alpha=8, seed=2)
    ref, other_ref = AdapterRef(key="acme/klein", uri=str(klein_adapter)), AdapterRef(key="acme/o", uri=str(other))
    plain.pipe.load_lora_weights(str(klein_adapter), adapter_name="by_diffusers")
    expected = image(plain)
    plain.pipe.delete_adapters("by_diffusers")
    with LoraPool(plain.pipe).use(ref):
        assert np.array_equal(image(plain), expected)
    pool = LoraPool(swapped.pipe, max_adapters=1, hotswap_rank=8)
    with pool.use(other_ref):
        first = image(swapped)
    with pool.use(ref):
        assert np.array_equal(image(swapped), expected)
    assert loaded_adapter_names(swapped.pipe) == {"slot0"} and not np.array_equal(first, expected)


def test_lora_create_writes_a_tiny_flux2_adapter_and_models_list_shows_licences(flux2, tmp_path):
    out = tmp_path / "cli.safetensors"
    created = subprocess.run([sys.executable, "-m", "factory", "lora", "create", str(out), "--profile", "tiny-flux2",
                              "--rank", "4"], capture_output=True, text=True, timeout=300)
    assert created.returncode == 0, created.stderr
    prepared = prepare_adapter(read_adapter(str(out)), flux2.generator.pipe)
    assert prepared.max_rank == 4 and prepared.modules("transformer")
    listed = subprocess.run([sys.executable, "-m", "factory", "models", "list"], capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "licence:   Apache-2.0 (FLUX.2 [klein] 4B)" in listed.stdout
    assert "edits:     up to 1 reference image(s), on black-forest-labs/FLUX.1-Kontext-dev" in listed.stdout
    kohya = subprocess.run([sys.executable, "-m", "factory", "lora", "create", str(tmp_path / "k.safetensors"),
                            "--profile", "tiny-flux2", "--format", "kohya"], capture_output=True, text=True, timeout=300)
    assert kohya.returncode != 0 and "kohya layout is written for FLUX.1 transformers only" in kohya.stderr


def test_a_second_edit_transformer_carries_the_same_adapters(tiny_path, tmp_path):
    """FLUX.1 [dev] beside Kontext [dev], in miniature: the edit transformer is another tiny FLUX.1 checkpoint."""
    build_flux(tmp_path / "kontext", seed=7)
    profile = get_profile("tiny").generator
    generator = FluxGenerator.from_pretrained(tiny_path / "flux", profile,
                                              edit_transformer=ModelSource(source=str(tmp_path / "kontext")))
    assert len(generator.transformers) == 2 and generator.lora_mirrors == [generator.edit_pipe]
    assert generator.edit_pipe.vae is generator.pipe.vae and generator.edit_pipe.text_encoder_2 is generator.pipe.text_encoder_2
    adapter = create_lora(tmp_path / "a.safetensors", transformer=generator.pipe.transformer, rank=4, seed=3)
    ref = AdapterRef(key="acme/a", uri=str(adapter))
    edit = [EditParams("make it blue", (Image.new("RGB", (96, 64), (200, 120, 40)),), 3, 2, 2.5, 64, 64)]
    pool = LoraPool(generator.pipe, mirrors=generator.lora_mirrors)
    base = np.asarray(generator.edit(edit)[0]).astype(int)
    with pool.use(ref):
        styled = np.asarray(generator.edit(edit)[0]).astype(int)
        assert set(generator.edit_pipe.transformer.peft_config) == {ref.adapter_name}
    assert np.abs(styled - base).max() > 0  # the adapter reached the edit transformer
    pool.clear()  # evicted from both transformers
    assert not getattr(generator.edit_pipe.transformer, "peft_config", None)
    assert loaded_adapter_names(generator.pipe) == set()
    with pool.use(None):
        assert np.array_equal(np.asarray(generator.edit(edit)[0]).astype(int), base)
