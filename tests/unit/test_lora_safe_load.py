"""Adapter files are distrusted: pickles, fake safetensors, wrong shapes, wrong digests and oversize files are
refused before any library loads them, and the pipeline is left exactly as it was."""

from __future__ import annotations

import builtins
import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from factory.errors import InputError
from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import AdapterError, AdapterRef, LoadLimits, LoraPool, create_lora, load_adapter
from factory.model.lora.safe_load import check_safetensors_header, loaded_adapter_names, read_adapter
from factory.model.profiles import get_profile


class CreatesMarker:
    """Unpickling this object opens (creates) a file: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def generator(tiny_path) -> FluxGenerator:
    """Never has an adapter loaded: tests that load one successfully use `fresh`."""
    return FluxGenerator.from_pretrained(tiny_path / "flux", get_profile("tiny").generator)


@pytest.fixture
def fresh(tiny_path) -> FluxGenerator:
    return FluxGenerator.from_pretrained(tiny_path / "flux", get_profile("tiny").generator)


@pytest.fixture(scope="module")
def adapter(generator, tmp_path_factory) -> Path:
    return create_lora(tmp_path_factory.mktemp("adapters") / "good.safetensors", transformer=generator.pipe.transformer,
                       rank=4, alpha=4, seed=3)


def pixels(generator: FluxGenerator) -> np.ndarray:
    params = GenerationParams(prompt="a red bicycle", seed=5, steps=2, width=64, height=64, guidance=3.5)
    return np.asarray(generator.generate([params])[0]).astype(int)


def peft_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in [*pipe.transformer.modules(), *pipe.text_encoder.modules()])


def assert_untouched(generator: FluxGenerator, base: np.ndarray) -> None:
    assert loaded_adapter_names(generator.pipe) == set() and peft_layers(generator.pipe) == 0
    assert np.array_equal(pixels(generator), base)


@pytest.fixture(scope="module")
def base_pixels(generator) -> np.ndarray:
    return pixels(generator)


def test_the_marker_payload_is_live_so_the_refusals_below_mean_something(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(CreatesMarker(marker)))
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth", ".pkl", ".BIN"])
def test_pickle_checkpoints_are_refused_by_name_and_never_run(generator, base_pixels, tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": CreatesMarker(marker)}, path)
    pool = LoraPool(generator.pipe)
    with pytest.raises(AdapterError, match="pickle"):
        pool.ensure_loaded(AdapterRef(key="evil/x", uri=str(path)))
    assert not marker.exists()
    assert pool.stats()["load_failures"] == 1
    assert_untouched(generator, base_pixels)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_renamed_to_safetensors_is_refused_by_its_bytes(generator, base_pixels, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    payload = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": CreatesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(AdapterError, match="not safetensors; pickle can run code"):
        load_adapter(generator.pipe, str(path), "evil")
    assert not marker.exists()
    assert_untouched(generator, base_pixels)


def _framed(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than"),
        (b"\x00" * 4, "shorter than"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
        (_framed([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
        (_framed({}), "holds no tensors"),
        (_framed({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "data section"),
        (_framed({"w": {"dtype": "F32", "shape": [1]}}, b"\x00" * 4), "bad header entry"),
        (_framed({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": 1}}, b"\0" * 4),
         "__metadata__"),
    ],
)
def test_header_must_be_valid_safetensors_framing(data, reason):
    with pytest.raises(AdapterError, match=reason):
        check_safetensors_header(data, "x.safetensors")


def test_framing_that_passes_but_tensors_that_do_not_is_still_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(_framed({"w": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4))
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        read_adapter(str(path))


def test_an_adapter_for_another_base_model_is_refused_before_loading(generator, base_pixels, tmp_path):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # only shapes matter; no weights are allocated
        wider = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=[8, 12, 12],
        )
        deeper = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=[4, 6, 6],
        )
    wide = create_lora(tmp_path / "wide.safetensors", transformer=wider, rank=4, alpha=4)
    with pytest.raises(AdapterError, match=r"128->128 in the adapter but 64->64 in the model"):
        load_adapter(generator.pipe, str(wide), "wide")
    deep = create_lora(tmp_path / "deep.safetensors", transformer=deeper, rank=4, alpha=4)
    with pytest.raises(AdapterError, match=r"transformer_blocks\.1\..* which this model \(FluxTransformer2DModel\) does not have"):
        load_adapter(generator.pipe, str(deep), "deep")
    assert_untouched(generator, base_pixels)


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    return str(path)


def test_key_level_refusals(generator, base_pixels, tmp_path):
    a_key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    b_key = a_key.replace("lora_A", "lora_B")
    cases = {
        "zero.safetensors": ({a_key: torch.randn(4, 64), b_key: torch.zeros(64, 4)}, "change nothing"),
        "half.safetensors": ({a_key: torch.randn(4, 64)}, "without its partner"),
        "nan.safetensors": ({a_key: torch.full((4, 64), float("nan")), b_key: torch.ones(64, 4)}, "NaN"),
        "dora.safetensors": ({a_key: torch.randn(4, 64), b_key: torch.ones(64, 4),
                              a_key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(64)}, "DoRA"),
        "norm.safetensors": ({a_key: torch.randn(4, 64), b_key: torch.ones(64, 4),
                              "transformer.transformer_blocks.0.attn.norm_q.weight": torch.ones(16)}, "Control LoRA"),
        "t5.safetensors": ({"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.randn(4, 32),
                            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.ones(32, 4)},
                           "load into transformer and text_encoder only"),
        "int.safetensors": ({a_key: torch.ones(4, 64, dtype=torch.int32), b_key: torch.ones(64, 4)}, "floating point"),
        "norm-target.safetensors": ({"transformer.transformer_blocks.0.norm1.norm.lora_A.weight": torch.randn(4, 64),
                                     "transformer.transformer_blocks.0.norm1.norm.lora_B.weight": torch.ones(64, 4)},
                                    "not a Linear layer"),
    }
    for name, (tensors, reason) in cases.items():
        with pytest.raises(AdapterError, match=reason):
            load_adapter(generator.pipe, _write(tmp_path / name, tensors), "bad")
    assert_untouched(generator, base_pixels)


def test_sha256_is_checked_and_size_is_capped(generator, base_pixels, adapter):
    with pytest.raises(AdapterError, match="sha256 mismatch"):
        read_adapter(str(adapter), sha256="0" * 64)
    with pytest.raises(AdapterError, match="larger than the 1000 byte limit"):
        read_adapter(str(adapter), limits=LoadLimits(max_bytes=1000))
    pool = LoraPool(generator.pipe, limits=LoadLimits(max_bytes=1000))
    with pytest.raises(AdapterError, match="byte limit"):
        pool.ensure_loaded(AdapterRef(key="t/big", uri=str(adapter)))
    assert_untouched(generator, base_pixels)

def test_the_right_digest_loads_and_is_reported(fresh, adapter):
    digest = hashlib.sha256(adapter.read_bytes()).hexdigest()
    pool = LoraPool(fresh.pipe)
    loaded = pool.ensure_loaded(AdapterRef(key="t/good", uri=str(adapter), sha256=digest))
    assert loaded.sha256 == digest
    pool.clear()
    assert loaded_adapter_names(fresh.pipe) == set()


def test_missing_files_and_unknown_schemes_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_adapter(str(tmp_path / "nope.safetensors"))
    with pytest.raises(InputError, match="is a directory"):
        read_adapter(str(tmp_path))
    with pytest.raises(InputError, match="pass a Storage"):
        read_adapter("s3://bucket/a.safetensors")


def test_a_text_encoder_lora_in_peft_layout_is_checked_against_the_text_encoder(fresh, base_pixels, tmp_path):
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    good = {f"{te}.lora_A.weight": torch.randn(4, 32) * 0.2, f"{te}.lora_B.weight": torch.randn(32, 4) * 0.2}
    prepared = load_adapter(fresh.pipe, _write(tmp_path / "te.safetensors", good), "te")
    assert prepared.targets == {("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): 4}
    changed = pixels(fresh)
    fresh.pipe.delete_adapters("te")
    assert not np.array_equal(changed, base_pixels)
    wrong = {f"{te}.lora_A.weight": torch.randn(4, 64), f"{te}.lora_B.weight": torch.randn(64, 4)}
    with pytest.raises(AdapterError, match="64->64 in the adapter but 32->32"):
        load_adapter(fresh.pipe, _write(tmp_path / "te-wrong.safetensors", wrong), "te2")


def test_adapters_load_from_s3_through_storage(fresh, adapter, s3_endpoint):
    from factory.io.storage import Storage
    from tests.s3server import new_bucket

    uri = new_bucket(s3_endpoint) + "/acme/brand.safetensors"
    storage = Storage()
    storage.write_bytes(uri, adapter.read_bytes())
    pool = LoraPool(fresh.pipe, storage=storage)
    loaded = pool.ensure_loaded(AdapterRef(key="acme/brand", uri=uri))
    assert loaded.sha256 == hashlib.sha256(adapter.read_bytes()).hexdigest()
    with pytest.raises(AdapterError, match="no such file"):
        pool.ensure_loaded(AdapterRef(key="acme/missing", uri=uri.replace("brand", "missing")))
    pool.clear()
