"""Make random-but-valid LoRA adapters for a profile's transformer (tests, benchmarks, demos).

peft builds the LoRA layout (`LoraConfig` + `get_peft_model_state_dict`) on a meta-device copy of the
transformer -- only module names and shapes matter, so no weights are read or copied. The weights are then
drawn from one seeded generator: peft's default init leaves B at zero, which would change nothing.

Formats:
- `diffusers`: written by `FluxPipeline.save_lora_weights(..., safe_serialization=True)` with the `LoraConfig`
  in the header, exactly as diffusers' training scripts write it.
- `kohya`: `lora_down` / `lora_up` / `alpha` keys named after the module path with '_' in place of '.', under
  the `lora_transformer_` prefix. diffusers' FLUX converter reads that prefix on diffusers module paths (the
  layout OneTrainer writes); `lora_unet_` on FLUX is read only with the original BFL module names and fused
  qkv (sd-scripts), whose single-block split is hard-coded to FLUX.1's sizes. The result is checked by
  converting it back with `FluxPipeline.lora_state_dict` before it is written.

Same arguments, same bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

LoraFormat = Literal["diffusers", "kohya"]
FORMATS: tuple[str, ...] = ("diffusers", "kohya")
# Attention projections of FLUX's double blocks (image and text streams) and single blocks.
# FLUX.2's single blocks fuse q/k/v and the MLP's input into one projection, `to_qkv_mlp_proj`, which adapters
# trained for FLUX.2 target as well.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "to_qkv_mlp_proj")
# Spectral size of the random delta relative to a unit-gain layer: visible in images, far from unstable.
DEFAULT_STRENGTH = 0.25
KOHYA_PREFIX = "lora_transformer_"
_DTYPES = {"float32", "bfloat16", "float16"}


def _meta_copy(transformer: Any) -> Any:
    import torch

    with torch.device("meta"):
        return type(transformer).from_config(transformer.config)


def attention_targets(transformer: Any) -> list[str]:
    """The attention projections this transformer has (`add_*` only exist in double blocks)."""
    import torch

    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    return [t for t in ATTENTION_TARGETS if any(n == t or n.endswith("." + t) for n in names)]


def lora_layout(transformer: Any, *, rank: int, alpha: float, target_modules: list[str] | None = None):
    """(peft LoraConfig, {peft key: shape}) for `transformer`, computed on a meta-device copy."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    skeleton = _meta_copy(transformer)
    targets = sorted(target_modules or attention_targets(skeleton))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    try:
        skeleton = inject_adapter_in_model(config, skeleton, adapter_name="default")
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"no Linear layer of this transformer matches target_modules {targets}") from error
    shapes = {key: tuple(t.shape) for key, t in get_peft_model_state_dict(skeleton, adapter_name="default").items()}
    if not shapes:
        raise ValueError(f"no Linear layer of this transformer matches target_modules {targets}")
    return config, shapes


def random_lora_weights(
    shapes: dict[str, tuple[int, ...]], *, rank: int, alpha: float, seed: int, strength: float = DEFAULT_STRENGTH,
    dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """A ~ N(0, 1/in), B ~ N(0, (strength * sqrt(rank) / alpha)^2).

    Then the applied delta (alpha / rank) * B @ A has entries of variance strength^2 / in, i.e. about the same
    relative effect for any rank, alpha or layer width.
    """
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    b_std = strength * rank**0.5 / alpha
    weights: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):  # a fixed order: the same seed gives the same tensors
        shape = shapes[key]
        std = shape[1] ** -0.5 if ".lora_A." in key else b_std
        weights[key] = (torch.randn(shape, generator=generator) * std).to(getattr(torch, dtype)).contiguous()
    return weights


def to_kohya(weights: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    import torch

    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        module, _, rest = key.partition(".lora_")
        name = KOHYA_PREFIX + module.replace(".", "_")
        if rest.startswith("A."):
            kohya[f"{name}.lora_down.weight"] = tensor
            kohya[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        else:
            kohya[f"{name}.lora_up.weight"] = tensor
    return kohya


def _check_kohya_round_trip(kohya: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    from diffusers import FluxPipeline

    converted = FluxPipeline.lora_state_dict(dict(kohya))
    expected = {f"transformer.{key}" for key in weights}
    if set(converted) != expected:
        missing = sorted(expected - set(converted))[:3]
        raise ValueError(f"these layers have no kohya name diffusers reads back: {missing}")


def _sort_header(path: Path) -> None:
    """safetensors writes `__metadata__` from a hash map, in an order that changes from call to call. Rewrite
    the JSON header with sorted keys -- same length, same data section -- so equal inputs give equal bytes."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    text = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    if len(text) > length:
        raise RuntimeError(f"{path}: header grew when sorted; not rewriting it")
    # safetensors pads the header with spaces to keep the data aligned; keep its length.
    path.write_bytes(data[:8] + text.ljust(length, b" ") + data[8 + length :])


def _write_atomically(out: Path, write) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".lora-") as staging:
        write(Path(staging))
        _sort_header(Path(staging) / out.name)
        # The staging folder is private; the adapter gets the permissions any new file would get.
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(Path(staging) / out.name, 0o666 & ~mask)
        os.replace(Path(staging) / out.name, out)


def create_lora(
    out_path: str | Path, *, transformer: Any, rank: int = 8, alpha: float = 16, seed: int = 0,
    format: LoraFormat = "diffusers", target_modules: list[str] | None = None, strength: float = DEFAULT_STRENGTH,
    dtype: str = "float32",
) -> Path:
    """Write a random-init LoRA for `transformer` (real or meta-device) to `out_path` (a .safetensors file)."""
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the adapter file name must end in .safetensors")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if rank < 1 or alpha <= 0 or strength <= 0 or dtype not in _DTYPES:
        raise ValueError("rank >= 1, alpha > 0, strength > 0 and a float dtype are required")
    if format == "kohya" and type(transformer).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"the kohya layout is written for FLUX.1 transformers only, not {type(transformer).__name__} "
                         "(diffusers reads FLUX.2 kohya files by the original BFL module names); use diffusers")
    config, shapes = lora_layout(transformer, rank=rank, alpha=alpha, target_modules=target_modules)
    weights = random_lora_weights(shapes, rank=rank, alpha=alpha, seed=seed, strength=strength, dtype=dtype)
    write_adapter(out, weights, config, format=format)
    log.info("adapter created", path=str(out), format=format, rank=rank, alpha=alpha, seed=seed,
             layers=len(shapes) // 2)
    return out


def write_adapter(out: Path, weights: dict[str, torch.Tensor], config: Any, *, format: LoraFormat = "diffusers",
                  metadata: dict[str, str] | None = None) -> Path:
    """Write peft-keyed LoRA `weights` (as `get_peft_model_state_dict` gives them) made with the peft
    `LoraConfig` `config` to the local file `out`, atomically, in `format`; `metadata` (str -> str) joins the
    safetensors header. Same inputs, same bytes."""
    import safetensors.torch
    from diffusers import FluxPipeline

    extra = dict(metadata or {})
    if format == "diffusers":
        lora_metadata = config.to_dict()
        # Sets serialise in hash order, which changes between processes: sort them so bytes are reproducible.
        lora_metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in lora_metadata.items()}

        def save(folder: Path) -> None:
            FluxPipeline.save_lora_weights(
                folder, transformer_lora_layers=weights, weight_name=out.name, safe_serialization=True,
                transformer_lora_adapter_metadata=lora_metadata,
            )
            if extra:  # save_lora_weights has no place for other metadata: write the file again with it
                path = folder / out.name
                with safetensors.safe_open(str(path), framework="pt") as written:
                    header = written.metadata() or {}
                safetensors.torch.save_file(safetensors.torch.load_file(str(path)), str(path),
                                            metadata={**header, **extra})

        _write_atomically(out, save)
    else:
        kohya = to_kohya(weights, config.lora_alpha)
        _check_kohya_round_trip(kohya, weights)
        header = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                  "ss_network_alpha": str(float(config.lora_alpha)), **extra}
        _write_atomically(out, lambda folder: safetensors.torch.save_file(kohya, folder / out.name, metadata=header))
    return out


def create_lora_for_profile(
    out: str | Path, profile_name: str, rank: int = 8, alpha: float = 16, seed: int = 0,
    format: LoraFormat = "diffusers",
) -> Path:
    """For the CLI: an adapter that fits `profile_name`'s transformer (FLUX.1 or FLUX.2). Reads the transformer's
    config only."""
    import diffusers
    import torch

    from factory.model.generator import TRANSFORMER_CLASSES
    from factory.model.profiles import get_profile
    from factory.model.stack import resolve_sources

    profile = get_profile(profile_name)
    source, _, _ = resolve_sources(profile)
    transformer_class = getattr(diffusers, TRANSFORMER_CLASSES[profile.generator.family])
    config = transformer_class.load_config(source, subfolder="transformer", revision=profile.generator.revision)
    with torch.device("meta"):
        skeleton = transformer_class.from_config(config)
    return create_lora(out, transformer=skeleton, rank=rank, alpha=alpha, seed=seed, format=format)
