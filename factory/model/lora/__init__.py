"""LoRA adapters on FLUX: safe loading, a bounded pool with one active adapter per batch, and adapter creation.

Heavy libraries (torch, diffusers, peft) are imported inside functions, so importing this package is cheap.
"""

from factory.model.lora.create import create_lora, create_lora_for_profile
from factory.model.lora.pool import LoadedAdapter, LoraPool
from factory.model.lora.ref import AdapterRef
from factory.model.lora.safe_load import AdapterError, ByteSource, LoadLimits, LocalFiles, load_adapter

__all__ = [
    "AdapterError", "AdapterRef", "ByteSource", "LoadLimits", "LoadedAdapter", "LocalFiles", "LoraPool",
    "create_lora", "create_lora_for_profile", "load_adapter",
]
