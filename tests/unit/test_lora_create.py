"""Making adapters: deterministic files, diffusers and kohya layouts that load back and change the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import AdapterRef, LoraPool, create_lora, create_lora_for_profile
from factory.model.lora.create import attention_targets
from factory.model.profiles import get_profile


@pytest.fixture(scope="module")
def generator(tiny_path) -> FluxGenerator:
    return FluxGenerator.from_pretrained(tiny_path / "flux", get_profile("tiny").generator)


def pixels(generator: FluxGenerator) -> np.ndarray:
    params = GenerationParams(prompt="a bowl of fruit", seed=21, steps=2, width=64, height=64, guidance=3.5)
    return np.asarray(generator.generate([params])[0]).astype(int)


def keys_and_metadata(path) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return sorted(handle.keys()), handle.metadata()


def test_same_seed_same_bytes_other_seed_other_bytes(generator, tmp_path):
    transformer = generator.pipe.transformer
    first = create_lora(tmp_path / "one.safetensors", transformer=transformer, seed=7)
    again = create_lora(tmp_path / "two.safetensors", transformer=transformer, seed=7)
    other = create_lora(tmp_path / "three.safetensors", transformer=transformer, seed=8)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    kohya = create_lora(tmp_path / "k1.safetensors", transformer=transformer, seed=7, format="kohya")
    assert kohya.read_bytes() == create_lora(tmp_path / "k2.safetensors", transformer=transformer, seed=7,
                                             format="kohya").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_diffusers_layout_targets_attention_and_records_its_config(generator, tmp_path):
    path = create_lora(tmp_path / "d.safetensors", transformer=generator.pipe.transformer, rank=4, alpha=8)
    keys, metadata = keys_and_metadata(path)
    assert attention_targets(generator.pipe.transformer) == list(
        ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.1.attn.to_v.lora_B.weight" in keys
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 8)


def test_kohya_layout_loads_changes_the_image_and_matches_the_diffusers_layout(generator, tmp_path):
    transformer = generator.pipe.transformer
    kohya = create_lora(tmp_path / "k.safetensors", transformer=transformer, rank=8, alpha=16, seed=5, format="kohya")
    same = create_lora(tmp_path / "d.safetensors", transformer=transformer, rank=8, alpha=16, seed=5)
    keys, metadata = keys_and_metadata(kohya)
    assert "lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight" in keys
    assert "lora_transformer_single_transformer_blocks_1_attn_to_q.lora_up.weight" in keys
    assert "lora_transformer_transformer_blocks_0_attn_add_k_proj.alpha" in keys
    assert metadata["ss_network_dim"] == "8"
    base = pixels(generator)
    pool = LoraPool(generator.pipe)
    try:
        pool.activate(AdapterRef(key="t/kohya", uri=str(kohya)))
        from_kohya = pixels(generator)
        pool.activate(AdapterRef(key="t/diffusers", uri=str(same)))
        from_diffusers = pixels(generator)
    finally:
        pool.clear()
    assert np.abs(from_kohya - base).max() > 2
    # kohya's alpha is folded into the weights by diffusers' converter, diffusers' applied at run time.
    assert np.abs(from_kohya - from_diffusers).max() <= 1


def test_arguments_are_checked(generator, tmp_path):
    transformer = generator.pipe.transformer
    with pytest.raises(ValueError, match="must end in .safetensors"):
        create_lora(tmp_path / "x.bin", transformer=transformer)
    with pytest.raises(ValueError, match="format must be one of"):
        create_lora(tmp_path / "x.safetensors", transformer=transformer, format="xlabs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no Linear layer"):
        create_lora(tmp_path / "x.safetensors", transformer=transformer, target_modules=["nope"])
    with pytest.raises(ValueError, match="no kohya name diffusers reads back"):
        create_lora(tmp_path / "x.safetensors", transformer=transformer, target_modules=["proj_mlp"], format="kohya")


def test_create_for_the_tiny_profile_reads_only_its_transformer_config(tiny_path, tmp_path):
    path = create_lora_for_profile(tmp_path / "tiny.safetensors", "tiny", rank=4, alpha=4, seed=1, format="kohya")
    keys, _ = keys_and_metadata(path)
    assert len(keys) == 14 * 3  # 14 attention layers: down, up, alpha
