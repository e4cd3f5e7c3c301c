"""The LoRA being trained: checked against the transformer before anything runs, added with peft the way
diffusers' FLUX training script adds it, and written in the formats the factory loads.

The adapter file is the factory's ordinary one (`factory.model.lora.create.write_adapter`: diffusers' own
`FluxPipeline.save_lora_weights` with the peft `LoraConfig` in the header, or kohya keys that diffusers reads
back), with the training's facts added to its safetensors header under `factory.*` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.errors import ConfigError
from factory.model.lora.create import LoraFormat, write_adapter
from factory.model.training.options import TrainOptions

if TYPE_CHECKING:
    import torch

ADAPTER_NAME = "default"  # peft's name for the one adapter a training run adds
TRANSFORMER_PREFIX = "transformer."  # what save_lora_weights puts before every transformer key


def linear_layers(transformer: Any) -> dict[str, Any]:
    """Every `nn.Linear` of `transformer` by module path (a meta-device copy will do)."""
    import torch

    return {name: module for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}


def check_lora_fits(transformer: Any, options: TrainOptions, where: str = "options") -> None:
    """Refuse, naming it, a target the transformer does not have or a rank its smallest targeted layer cannot
    hold (a rank above min(in, out) adds parameters but no capacity: the update's rank cannot exceed it)."""
    layers = linear_layers(transformer)
    targeted: list[tuple[str, Any]] = []
    for target in options.target_modules:
        matches = [(name, layer) for name, layer in layers.items() if name == target or name.endswith("." + target)]
        if not matches:
            leaves = sorted({_leaf(name) for name in layers})
            raise ConfigError(f"{where}.target_modules: {target!r} is not a Linear layer of this profile's "
                              f"transformer (it has: {', '.join(leaves)})")
        targeted.extend(matches)
    name, smallest = min(targeted, key=lambda item: min(item[1].in_features, item[1].out_features))
    capacity = min(smallest.in_features, smallest.out_features)
    if options.rank > capacity:
        raise ConfigError(f"{where}.rank: {options.rank} is more than this profile's transformer can hold in "
                          f"{name} ({smallest.in_features}->{smallest.out_features}); at most {capacity}")


def _leaf(module_path: str) -> str:
    """The short name peft matches: `to_q`, or `to_out.0` for a layer inside a ModuleList."""
    parent, _, last = module_path.rpartition(".")
    return f"{parent.rpartition('.')[2]}.{last}" if last.isdigit() else last


def lora_config(options: TrainOptions):
    """The peft config diffusers' FLUX script uses: gaussian init (B = 0, so step 0 is the base model)."""
    from peft import LoraConfig

    return LoraConfig(r=options.rank, lora_alpha=options.lora_alpha, init_lora_weights="gaussian",
                      target_modules=list(options.target_modules))


def add_lora(transformer: Any, options: TrainOptions) -> None:
    """Freeze `transformer` and add the trainable LoRA (float32 weights whatever the model's dtype, as
    diffusers' `cast_training_params` leaves them). The init draws from torch's global generator: seeded here,
    so every worker starts from the same adapter."""
    import torch
    from diffusers.training_utils import cast_training_params

    check_lora_fits(transformer, options)
    transformer.requires_grad_(False)
    torch.manual_seed(options.seed)
    transformer.add_adapter(lora_config(options))
    cast_training_params(transformer, dtype=torch.float32)


def lora_weights(transformer: Any) -> dict[str, torch.Tensor]:
    """The trained pairs, peft-keyed (`<module>.lora_A.weight`), detached float32 copies on the CPU."""
    import torch
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in state.items()}


def restore_lora(transformer: Any, adapter_file: Path) -> None:
    """Put the weights of an adapter file this module wrote (diffusers format) back into `transformer`."""
    import safetensors.torch
    from peft import set_peft_model_state_dict

    saved = safetensors.torch.load_file(str(adapter_file))
    state = {key.removeprefix(TRANSFORMER_PREFIX): tensor for key, tensor in saved.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_file}: keys this run's LoRA does not have, e.g. {result.unexpected_keys[0]}")


def save_lora(transformer: Any, options: TrainOptions, out: Path, metadata: dict[str, str],
              format: LoraFormat = "diffusers") -> Path:
    """The adapter as it stands, written to the local file `out`, with `metadata` under `factory.` keys."""
    header = {f"factory.{key}": value for key, value in metadata.items()}
    return write_adapter(out, lora_weights(transformer), lora_config(options), format=format, metadata=header)


def convert_adapter(source: Path, out: Path, options: TrainOptions, format: LoraFormat) -> Path:
    """An adapter file this module wrote, written again in `format` (kohya keys on request) with its metadata."""
    import safetensors.torch

    saved = safetensors.torch.load_file(str(source))
    weights = {key.removeprefix(TRANSFORMER_PREFIX): tensor for key, tensor in saved.items()}
    header = {f"factory.{key}": value for key, value in metadata_of(source).items()}
    return write_adapter(out, weights, lora_config(options), format=format, metadata=header)


def metadata_of(adapter_file: str | Path) -> dict[str, str]:
    """The `factory.*` entries of an adapter's header, without the prefix (for reports and tests)."""
    import safetensors

    with safetensors.safe_open(str(adapter_file), framework="pt") as opened:
        header = opened.metadata() or {}
    return {key.removeprefix("factory."): value for key, value in header.items() if key.startswith("factory.")}
