"""Load a LoRA adapter file into a FluxPipeline without trusting the file.

Order of checks, each one before anything later sees the bytes:

1. the name: pickle-based suffixes (`.bin .pt .pth .ckpt .pkl .pickle`) are refused outright;
2. the size: read at most `max_bytes` (+1 to notice a larger file);
3. the digest: when the registry pins a sha256, the bytes must match it;
4. the bytes: the file must *be* safetensors -- an 8-byte little-endian header length, a JSON header whose
   entries cover the data section exactly -- whatever its name says; pickle and torch-zip magic get a
   clear message;
5. the tensors are parsed by `safetensors` from memory (never `torch.load`);
6. ecosystem key formats (kohya, ai-toolkit, peft) are converted by diffusers' own `lora_state_dict` of the
   pipeline's class (FluxPipeline, Flux2KleinPipeline), and every LoRA A/B pair is checked against the pipeline's
   modules: an existing `nn.Linear` (in a component the pipeline loads LoRAs into: FLUX.1's transformer and CLIP
   text encoder, FLUX.2's transformer) with matching in/out features. An adapter made for another architecture
   fails here, naming the layer it lacks or whose shape differs;
7. only then `pipe.load_lora_weights(<that dict>)` -- diffusers never opens the file -- and afterwards the
   adapter must sit on every layer it names with a non-zero delta, because files that load but change nothing
   happen (diffusers issues 9291, 9292).

Adapter metadata: diffusers writes a `LoraConfig` (`lora_alpha`, `r`, ...) into the safetensors header and
honours it when it loads a *path*, but not when it is handed a dict. So a uniform `lora_alpha` from that header
is carried as per-module `<module>.alpha` entries, the form `lora_state_dict` reads from a dict; metadata this
code cannot express that way (rsLoRA, DoRA, per-module alpha patterns) is refused rather than silently dropped.
FLUX.2's loader reads no alpha entries from a dict (it refuses keys without "lora"), so for it the scale alpha / rank
is folded into each pair's B weights, which diffusers then loads at alpha = rank: the same delta.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import structlog

from factory.errors import InputError

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
# FLUX.1 LoRAs with text-encoder layers have ~2k tensors (~200 kB of header); the cap only stops absurd headers.
DEFAULT_MAX_HEADER_BYTES = 8 * 1024 * 1024
# The components FluxPipeline.load_lora_weights loads into; keys for anything else would be dropped silently. Other
# pipelines say theirs in `_lora_loadable_modules` (Flux2KleinPipeline: the transformer only).
LORA_COMPONENTS = ("transformer", "text_encoder")
# Projections diffusers' fuse_qkv_projections replaces in the forward pass (it keeps the modules themselves).
_FUSABLE = frozenset({"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"})
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the LoraConfig it stores in the header

_PAIR_KEY = re.compile(r"^(?P<component>[A-Za-z0-9_]+)\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<component>[A-Za-z0-9_]+)\.(?P<module>.+)\.alpha$")
# Adapter kinds diffusers would load as something else, or drop with a warning.
_UNSUPPORTED_MARKERS = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".lokr_": "LoKr", ".hada_": "LoHa",
    "norm_q": "Control LoRA norm weights", "norm_k": "Control LoRA norm weights",
    "norm_added_q": "Control LoRA norm weights", "norm_added_k": "Control LoRA norm weights",
}


class AdapterError(InputError):
    """An adapter file was refused; the one-line message names the file and the reason."""


@dataclass(frozen=True)
class LoadLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


class ByteSource(Protocol):
    """Anything that reads a whole object with a size cap; `factory.io.storage.Storage` is one."""

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes: ...


class LocalFiles:
    """Reads local paths and file:// URIs. The replica passes a `Storage` instead to reach s3://."""

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        path = uri.removeprefix("file://")
        if "://" in path:
            raise AdapterError(f"{uri}: no reader for this scheme here (pass a Storage to the pool for s3://)")
        try:
            # Refuse by size before reading: a 50 GB "adapter" should cost a stat, not the memory.
            if max_bytes is not None and os.path.getsize(path) > max_bytes:
                raise AdapterError(f"{uri}: larger than the {max_bytes} byte limit")
            with open(path, "rb") as stream:
                data = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
        except FileNotFoundError:
            raise AdapterError(f"{uri}: no such file") from None
        except IsADirectoryError:
            raise AdapterError(f"{uri}: is a directory, expected a .safetensors file") from None
        except OSError as error:
            raise AdapterError(f"{uri}: {error.strerror or error}") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise AdapterError(f"{uri}: larger than the {max_bytes} byte limit")
        return data


@dataclass(frozen=True)
class AdapterFile:
    """A file that passed the byte-level checks, parsed into tensors."""

    uri: str
    sha256: str
    file_bytes: int
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against one pipeline: `state_dict` is exactly what `load_lora_weights` receives."""

    uri: str
    sha256: str
    state_dict: dict[str, Any] = field(repr=False)
    targets: dict[tuple[str, str], int] = field(repr=False)  # (component, module path) -> rank
    tensor_bytes: int
    alphas_in_weights: bool = False  # the pipeline reads no alpha entries: scale the B weights instead

    @property
    def max_rank(self) -> int:
        return max(self.targets.values())

    def modules(self, component: str) -> frozenset[str]:
        return frozenset(module for comp, module in self.targets if comp == component)

    def scaled(self, scale: float) -> dict[str, Any]:
        """The state dict with `scale` folded into every module's alpha (a layer without one has alpha = rank).

        For hot-swap slots: peft sets a swapped adapter's scaling from its alpha, and `set_adapters(weights=)`
        would recompute it from the slot's *first* adapter's alpha, so the strength has to travel in the alphas.
        """
        if self.alphas_in_weights:
            return self._folded(scale)
        if scale == 1.0:
            return dict(self.state_dict)
        scaled = dict(self.state_dict)
        for (component, module), rank in self.targets.items():
            key = f"{component}.{module}.alpha"
            scaled[key] = float(scaled.get(key, rank)) * scale
        return scaled

    def _folded(self, scale: float) -> dict[str, Any]:
        """The pairs alone, each B times scale * alpha / rank: loaded at alpha = rank, the same delta."""
        folded = {key: value for key, value in self.state_dict.items() if not _ALPHA_KEY.match(key)}
        for (component, module), rank in self.targets.items():
            factor = scale * float(self.state_dict.get(f"{component}.{module}.alpha", rank)) / rank
            if factor != 1.0:
                key = f"{component}.{module}.lora_B.weight"
                folded[key] = folded[key] * factor
        return folded

    def only(self, component: str) -> PreparedAdapter:
        """The part of this adapter that loads into `component` (a second transformer of the same architecture
        gets the transformer part; a shared text encoder already holds its own)."""
        prefix = f"{component}."
        state_dict = {key: value for key, value in self.state_dict.items() if key.startswith(prefix)}
        return PreparedAdapter(
            self.uri, self.sha256, state_dict, {t: r for t, r in self.targets.items() if t[0] == component},
            sum(v.numel() * v.element_size() for v in state_dict.values() if hasattr(v, "numel")),
            self.alphas_in_weights,
        )


# ---- 1-5: bytes -> tensors -----------------------------------------------------------------------------


def uri_suffix(uri: str) -> str:
    path = urlsplit(uri).path if "://" in uri else uri
    return PurePosixPath(path.replace("\\", "/")).suffix.lower()


def _sniff_pickle(data: bytes) -> str | None:
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format, pickle inside)"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return f"a pickle (protocol {data[1]})"
    return None


def header_json(raw: bytes, uri: str) -> dict:
    """A safetensors header's bytes as the JSON object they must be."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{uri}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{uri}: not a safetensors file (header is not a JSON object)")
    return header


def check_safetensors_header(data: bytes, uri: str, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, str]:
    """Validate the safetensors framing and return the header's `__metadata__` (str -> str)."""
    sniffed = _sniff_pickle(data)
    if sniffed:
        raise AdapterError(f"{uri}: refused: the file is {sniffed}, not safetensors; pickle can run code on load")
    if len(data) < 8:
        raise AdapterError(f"{uri}: not a safetensors file (shorter than its 8-byte header length)")
    length = int.from_bytes(data[:8], "little")
    if length < 2 or length > max_header_bytes or 8 + length > len(data):
        raise AdapterError(f"{uri}: not a safetensors file (header length {length} does not fit the file)")
    header = header_json(data[8 : 8 + length], uri)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError(f"{uri}: not a safetensors file (__metadata__ must map strings to strings)")
    if not header:
        raise AdapterError(f"{uri}: holds no tensors")
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (
            isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        )
        if not valid:
            raise AdapterError(f"{uri}: not a safetensors file (bad header entry {name!r})")
        end = max(end, offsets[1])
    if 8 + length + end != len(data):
        raise AdapterError(f"{uri}: not a safetensors file (data section does not match its header)")
    return metadata


def read_adapter(
    uri: str, *, source: ByteSource | None = None, sha256: str | None = None, limits: LoadLimits | None = None
) -> AdapterFile:
    """Steps 1-5: the file's bytes, checked, parsed into tensors by safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    limits = limits or LoadLimits()
    suffix = uri_suffix(uri)
    if suffix in PICKLE_SUFFIXES:
        raise AdapterError(f"{uri}: refused: {suffix} checkpoints are pickle, which can run code; use .safetensors")
    try:
        data = (source or LocalFiles()).read_bytes(uri, max_bytes=limits.max_bytes)
    except AdapterError:
        raise
    except InputError as error:
        raise AdapterError(str(error)) from error
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise AdapterError(f"{uri}: sha256 mismatch (expected {sha256}, file has {digest})")
    metadata = check_safetensors_header(data, uri, limits.max_header_bytes)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise AdapterError(f"{uri}: not a valid safetensors file ({str(error).splitlines()[0]})") from None
    return AdapterFile(uri, digest, len(data), tensors, metadata)


# ---- 6: tensors -> a state dict that fits this pipeline ------------------------------------------------


def _refuse_unsupported(adapter: AdapterFile) -> None:
    import torch

    for key, tensor in adapter.tensors.items():
        for marker, kind in _UNSUPPORTED_MARKERS.items():
            if marker in key:
                raise AdapterError(f"{adapter.uri}: {kind} adapters are not supported (key {key!r})")
        if not tensor.is_floating_point():
            raise AdapterError(f"{adapter.uri}: tensor {key!r} is {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{adapter.uri}: tensor {key!r} holds NaN or infinite values")


def _alphas_from_metadata(adapter: AdapterFile) -> dict[str, float]:
    """`<component>.<module>.alpha` entries equivalent to diffusers' header metadata (see module docstring)."""
    raw = adapter.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterError(f"{adapter.uri}: {METADATA_KEY} in the header is not JSON") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{adapter.uri}: {METADATA_KEY} in the header is not a JSON object")
    keys = list(adapter.tensors)
    if not all(_PAIR_KEY.match(k) or _ALPHA_KEY.match(k) for k in keys):
        raise AdapterError(f"{adapter.uri}: diffusers adapter metadata in a file whose keys are not "
                           "diffusers/peft keys")
    if any(_ALPHA_KEY.match(k) for k in keys):
        raise AdapterError(f"{adapter.uri}: both adapter metadata and per-module alpha tensors; ambiguous scale")
    alphas: dict[str, float] = {}
    for key in keys:
        match = _PAIR_KEY.match(key)
        if not match or match["kind"] != "A":
            continue
        component = match["component"]
        if config.get(f"{component}.use_rslora") or config.get(f"{component}.use_dora"):
            raise AdapterError(f"{adapter.uri}: rsLoRA/DoRA adapter metadata is not supported")
        if config.get(f"{component}.alpha_pattern"):
            raise AdapterError(f"{adapter.uri}: per-module alpha patterns in adapter metadata are not supported")
        alpha = config.get(f"{component}.lora_alpha")
        if alpha is not None:
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
                raise AdapterError(f"{adapter.uri}: lora_alpha in adapter metadata must be a positive number")
            alphas[f"{component}.{match['module']}.alpha"] = float(alpha)
    return alphas


def lora_components(pipe: Any) -> tuple[str, ...]:
    """The components `pipe.load_lora_weights` loads into."""
    return tuple(getattr(type(pipe), "_lora_loadable_modules", LORA_COMPONENTS))


def _reads_alphas(pipe: Any) -> bool:
    """Whether the pipeline's `lora_state_dict` hands back alphas (FLUX.1's does; FLUX.2's has no such option)."""
    return "return_alphas" in inspect.signature(type(pipe).lora_state_dict).parameters


def _convert(adapter: AdapterFile, pipe: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """diffusers' own converter: kohya / ai-toolkit / peft keys -> `<component>.<module>.lora_{A,B}.weight`."""
    raw: dict[str, Any] = dict(adapter.tensors)
    raw.update(_alphas_from_metadata(adapter))
    try:
        # lora_state_dict pops entries from the dict it is given: hand it our own copy.
        if _reads_alphas(pipe):
            state_dict, alphas = type(pipe).lora_state_dict(raw, return_alphas=True)
        else:  # the alpha entries come back among the pairs; take them out
            converted = type(pipe).lora_state_dict(raw)
            alphas = {key: value for key, value in converted.items() if _ALPHA_KEY.match(key)}
            state_dict = {key: value for key, value in converted.items() if key not in alphas}
    except Exception as error:  # noqa: BLE001 - the converters raise many types on odd input; all mean "refuse"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AdapterError(f"{adapter.uri}: not a LoRA layout diffusers can read ({message[:200]})") from None
    floats: dict[str, float] = {}
    for key, value in (alphas or {}).items():
        if getattr(value, "numel", lambda: 1)() != 1:
            raise AdapterError(f"{adapter.uri}: alpha {key!r} is not a scalar")
        # Plain floats: equal alphas then collapse to one lora_alpha instead of a per-module pattern.
        floats[key] = float(value)
    return state_dict, floats


def _module_path(model: Any, module: str) -> str:
    # CLIP LoRAs name layers `text_model.encoder...`; transformers 5's CLIPTextModel has no `text_model`
    # level, and diffusers drops the prefix in that case when it loads. Check the layer it will load into.
    if module.startswith("text_model.") and not hasattr(model, "text_model"):
        return module.removeprefix("text_model.")
    return module


def _linear(pipe: Any, component: str, module: str, uri: str):
    import torch

    model = getattr(pipe, component, None)
    if model is None:
        raise AdapterError(f"{uri}: targets {component}, which this pipeline does not have")
    path = _module_path(model, module)
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise AdapterError(f"{uri}: targets {component}.{module}, which this model ({type(model).__name__}) does not "
                           "have (made for another base model?)") from None
    parent_path, _, leaf = path.rpartition(".")
    if leaf in _FUSABLE and getattr(model.get_submodule(parent_path), "fused_projections", False):
        # The fused attention reads to_qkv / to_added_qkv; a LoRA on the separate projection would do nothing.
        raise AdapterError(f"{uri}: targets {component}.{module}, which this profile runs fused "
                           "(performance.fuse_qkv); turn fuse_qkv off to use adapters on q/k/v projections")
    # A layer that already carries other adapters is a peft wrapper around the original Linear.
    base = getattr(layer, "base_layer", layer)
    if not isinstance(base, torch.nn.Linear):
        raise AdapterError(f"{uri}: targets {component}.{module}, a {type(base).__name__}, not a Linear layer")
    return base


def prepare_adapter(adapter: AdapterFile, pipe: Any) -> PreparedAdapter:
    """Step 6: convert with diffusers, then check every pair against `pipe` -- before anything is loaded."""
    _refuse_unsupported(adapter)
    state_dict, alphas = _convert(adapter, pipe)
    components = lora_components(pipe)
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _PAIR_KEY.match(key)
        if not match and key.startswith("text_encoder."):
            # kohya text-encoder keys come out of the converter in an older diffusers layout; only the peft
            # layout is checked here, so the others are refused rather than loaded unchecked.
            raise AdapterError(f"{adapter.uri}: text-encoder LoRA keys are supported in peft layout only "
                               f"(text_encoder.<module>.lora_A.weight), got {key!r}")
        if not match:
            raise AdapterError(f"{adapter.uri}: unsupported key {key!r} after conversion")
        if match["component"] not in components:
            raise AdapterError(f"{adapter.uri}: targets {match['component']}; {type(pipe).__name__} LoRAs load "
                               f"into {' and '.join(components)} only")
        pairs.setdefault((match["component"], match["module"]), {})[match["kind"]] = tensor
    if not pairs:
        raise AdapterError(f"{adapter.uri}: holds no LoRA weights")
    targets: dict[tuple[str, str], int] = {}
    any_nonzero = False
    for (component, module), pair in sorted(pairs.items()):
        name = f"{component}.{module}"
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{adapter.uri}: {name} has lora_{'A' if 'A' in pair else 'B'} without its partner")
        down, up = pair["A"], pair["B"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] < 1:
            raise AdapterError(f"{adapter.uri}: {name} has A {tuple(down.shape)} and B {tuple(up.shape)}, "
                               "not a rank-r pair")
        linear = _linear(pipe, component, module, adapter.uri)
        if (down.shape[1], up.shape[0]) != (linear.in_features, linear.out_features):
            raise AdapterError(
                f"{adapter.uri}: {name} is {down.shape[1]}->{up.shape[0]} in the adapter but "
                f"{linear.in_features}->{linear.out_features} in the model (made for another base model?)"
            )
        targets[(component, module)] = int(down.shape[0])
        any_nonzero = any_nonzero or bool(up.count_nonzero()) and bool(down.count_nonzero())
    if not any_nonzero:
        raise AdapterError(f"{adapter.uri}: every LoRA pair is zero, so this adapter would change nothing")
    for key in alphas:
        match = _ALPHA_KEY.match(key)
        if not match or (match["component"], match["module"]) not in targets:
            raise AdapterError(f"{adapter.uri}: alpha {key!r} belongs to no LoRA pair")
    tensor_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    return PreparedAdapter(adapter.uri, adapter.sha256, {**state_dict, **alphas}, targets, tensor_bytes,
                           alphas_in_weights=not _reads_alphas(pipe))


# ---- 7: load and verify ----------------------------------------------------------------------------------


def verify_loaded(pipe: Any, prepared: PreparedAdapter, adapter_name: str) -> None:
    """The adapter must be on every layer it names, and change at least one of them."""
    import torch

    missing, changes = [], False
    for component, module in prepared.targets:
        model = getattr(pipe, component)
        layer = model.get_submodule(_module_path(model, module))
        downs, ups = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
        if adapter_name not in downs or adapter_name not in ups:
            missing.append(f"{component}.{module}")
            continue
        if not changes:
            with torch.no_grad():
                delta = ups[adapter_name].weight @ downs[adapter_name].weight
            changes = bool(delta.count_nonzero())
    if missing:
        raise AdapterError(f"{prepared.uri}: loaded but absent from {len(missing)} layer(s) it names, "
                           f"e.g. {missing[0]}")
    if not changes:
        raise AdapterError(f"{prepared.uri}: loaded but changes no layer")


def load_prepared(
    pipe: Any, prepared: PreparedAdapter, adapter_name: str, *, hotswap: bool = False, scale: float = 1.0
) -> float:
    """Step 7: load the checked dict under `adapter_name` and verify it; returns milliseconds taken.

    `scale` is baked into the alphas (see `PreparedAdapter.scaled`); leave it at 1.0 and pass the strength to
    `set_adapters` instead wherever that works. On failure the adapter is removed again (diffusers itself
    drops a slot whose hot-swap failed).
    """
    started = time.perf_counter()
    try:
        # A fresh dict either way: diffusers pops alpha entries from the dict it is handed.
        pipe.load_lora_weights(prepared.scaled(scale), adapter_name=adapter_name, hotswap=hotswap)
        verify_loaded(pipe, prepared, adapter_name)
    except Exception as error:
        _remove_quietly(pipe, adapter_name)
        if isinstance(error, AdapterError):
            raise
        lines = str(error).strip().splitlines()
        reason = (lines[-1] if lines else type(error).__name__)[:200]
        raise AdapterError(f"{prepared.uri}: diffusers could not load it ({reason})") from error
    elapsed_ms = (time.perf_counter() - started) * 1000
    log.info("adapter loaded", uri=prepared.uri, adapter=adapter_name, hotswap=hotswap, ms=round(elapsed_ms, 1),
             layers=len(prepared.targets), rank=prepared.max_rank)
    return elapsed_ms


def _remove_quietly(pipe: Any, adapter_name: str) -> None:
    try:
        if adapter_name in loaded_adapter_names(pipe):
            pipe.delete_adapters(adapter_name)
    except Exception:  # noqa: BLE001 - already failing; the original error is the one to report
        log.warning("could not remove a half-loaded adapter", adapter=adapter_name)


def loaded_adapter_names(pipe: Any) -> set[str]:
    names: set[str] = set()
    for component in lora_components(pipe):
        names.update(getattr(getattr(pipe, component, None), "peft_config", None) or {})
    return names


def load_adapter(
    pipe: Any, uri: str, adapter_name: str, *, source: ByteSource | None = None, sha256: str | None = None,
    limits: LoadLimits | None = None, hotswap: bool = False,
) -> PreparedAdapter:
    """All seven steps for one file. The pool uses the steps separately to evict between checking and loading."""
    prepared = prepare_adapter(read_adapter(uri, source=source, sha256=sha256, limits=limits), pipe)
    load_prepared(pipe, prepared, adapter_name, hotswap=hotswap)
    return prepared
