"""A bounded, thread-safe pool of LoRA adapters on one FluxPipeline, with exactly one active per batch.

diffusers applies the active adapter set to every sample of a call, so a batch runs with one adapter (or none,
for base rows): `with pool.use(ref): pipe(...)` holds the pool's lock for the whole call so another thread cannot
switch adapters under it. All methods are plain (non-async) and thread-safe. In a Serve replica: call
`ensure_loaded(ref)` from the `@serve.multiplexed` loader (it reads and checks the file without holding the
lock, so a download does not stall a running batch), then `use(ref)` around the batch (a hit by then).

Bounds: `set_adapters` slows down as more adapters are loaded (diffusers issue 11816) and every adapter holds
memory, so the pool keeps at most `max_adapters` adapters and `max_bytes` of LoRA weights, evicting the least
recently used with `delete_adapters`.

Hot-swap mode (`hotswap_rank=R`, for a `torch.compile`d transformer): `enable_lora_hotswap(target_rank=R)` runs
before the first load, adapters live in fixed slots (`slot0`..), and a new adapter replaces an evicted one's
weights in place (`load_lora_weights(..., hotswap=True)`) so the compiled graph is reused. peft requires a
swapped-in adapter to target the slot's layers or a subset, with rank <= R, transformer only; the pool checks
that before touching the slot. Use `max_adapters=1` with a compiled transformer: switching between slots
changes which weights the graph reads. In this mode an adapter's scale is baked into its slot (a new scale
reloads it), and memory is fixed by the slots, so `max_bytes` only bounds a single adapter. A replica on a
compiled profile sets this mode up itself (`factory.routing.replica.plan_hotswap`): rank from the adapters'
headers, one slot, its widest adapter loaded before the transformer is compiled.

Mirrors: a profile whose edits run on a second transformer of the same architecture (FLUX.1 Kontext [dev] beside
FLUX.1 [dev], `FluxGenerator.lora_mirrors`) passes that pipeline as a mirror: every adapter's transformer part is
loaded, switched, hot-swapped and evicted there too, under the same name, so a tenant's adapter styles its edit
rows as it styles its generated ones. Text-encoder layers live once, in the text encoder both pipelines share.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from factory.errors import ModelError
from factory.model.lora.ref import AdapterRef
from factory.model.lora.safe_load import (
    AdapterError, ByteSource, LoadLimits, PreparedAdapter, load_prepared, loaded_adapter_names, prepare_adapter,
    read_adapter,
)

log = structlog.get_logger(__name__)

DEFAULT_MAX_ADAPTERS = 4
DEFAULT_MAX_BYTES = 2 * 1024**3
_UNKNOWN = object()  # the pipe's adapter state after a load or delete: diffusers may have changed it


@dataclass(frozen=True)
class LoadedAdapter:
    """What a caller records about the adapter a batch ran with."""

    key: str
    adapter_name: str  # diffusers' name (the slot name in hot-swap mode)
    sha256: str
    scale: float
    rank: int
    tensor_bytes: int


@dataclass
class _Entry:
    ref: AdapterRef
    name: str
    sha256: str
    rank: int
    tensor_bytes: int

    def view(self) -> LoadedAdapter:
        return LoadedAdapter(self.ref.key, self.name, self.sha256, self.ref.scale, self.rank, self.tensor_bytes)


class LoraPool:
    def __init__(
        self, pipe: Any, *, max_adapters: int = DEFAULT_MAX_ADAPTERS, max_bytes: int = DEFAULT_MAX_BYTES,
        storage: ByteSource | None = None, limits: LoadLimits | None = None, hotswap_rank: int | None = None,
        mirrors: Sequence[Any] = (),
    ) -> None:
        if max_adapters < 1 or max_bytes < 1:
            raise ValueError("max_adapters and max_bytes must be at least 1")
        self.pipe = pipe
        self.mirrors = list(mirrors)
        for mirror in self.mirrors:
            if _architecture(mirror.transformer) != _architecture(pipe.transformer):
                raise ModelError("a LoRA mirror's transformer must have the pipeline's architecture, "
                                 f"{type(pipe.transformer).__name__} with the same config")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.storage = storage
        self.limits = limits or LoadLimits()
        self.hotswap_rank = hotswap_rank
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._active: Any = _UNKNOWN  # (key, scale), None for the base model, or _UNKNOWN
        # Hot-swap mode: the layers each slot was first loaded with; peft fixes them for the slot's lifetime.
        self._slot_layers: dict[str, dict[str, frozenset[str]]] = {}
        self._counters: dict[str, float] = dict.fromkeys(
            ("hits", "misses", "evictions", "loads", "load_failures", "switches", "load_ms_total",
             "load_ms_last", "switch_ms_total", "switch_ms_last"), 0
        )
        if hotswap_rank is not None:
            if hotswap_rank < 1:
                raise ValueError("hotswap_rank must be at least 1")
            if loaded_adapter_names(pipe) or any(loaded_adapter_names(m) for m in self.mirrors):
                raise ModelError("LoRA hot-swap must be enabled before the pipeline's first adapter is loaded")
            # Pads every slot to this rank and turns scalings into tensors, so later swaps fit the compiled graph.
            pipe.enable_lora_hotswap(target_rank=hotswap_rank)
            for mirror in self.mirrors:
                mirror.transformer.enable_lora_hotswap(target_rank=hotswap_rank)

    # ---- public API ----------------------------------------------------------------------------------

    def ensure_loaded(self, ref: AdapterRef) -> LoadedAdapter:
        """Load `ref` if it is not loaded (evicting as needed); mark it most recently used.

        Reading and checking the file happen outside the lock, so a slow s3:// download does not hold up a batch
        running under `use()`; only the load into the pipeline (and eviction) takes the lock.
        """
        with self._lock:
            hit = self._hit(ref)
            if hit is not None:
                return hit
        try:
            adapter = read_adapter(ref.uri, source=self.storage, sha256=ref.sha256, limits=self.limits)
            prepared = prepare_adapter(adapter, self.pipe)  # reads module shapes only
        except AdapterError:
            with self._lock:
                self._counters["load_failures"] += 1
            raise
        with self._lock:
            hit = self._hit(ref)  # another thread may have loaded it meanwhile
            if hit is not None:
                return hit
            self._counters["misses"] += 1
            if ref.key in self._entries:
                # Same key, different file (the registry changed): the old weights must not serve it.
                self._evict(ref.key)
            try:
                return self._load(ref, prepared).view()
            except AdapterError:
                self._counters["load_failures"] += 1
                raise

    def _hit(self, ref: AdapterRef) -> LoadedAdapter | None:
        entry = self._entries.get(ref.key)
        # Hot-swap slots carry the strength in their weights' alphas, so there a new scale means a new load.
        if entry is None or not entry.ref.same_weights(ref) or (
            self.hotswap_rank is not None and entry.ref.scale != ref.scale
        ):
            return None
        self._counters["hits"] += 1
        self._entries.move_to_end(ref.key)
        entry.ref = ref  # a new scale needs no reload; activate() applies it
        return entry.view()

    def activate(self, ref: AdapterRef | None) -> LoadedAdapter | None:
        """Make `ref` the only active adapter, or (None) run the base model with every adapter disabled."""
        with self._lock:
            if ref is None:
                if self._active is not None:
                    if loaded_adapter_names(self.pipe):
                        started = time.perf_counter()
                        self.pipe.disable_lora()
                        for mirror in self.mirrors:
                            mirror.transformer.disable_lora()
                        self._record_switch(started)
                    self._active = None
                return None
            loaded = self.ensure_loaded(ref)
            if self._active != (ref.key, ref.scale):
                started = time.perf_counter()
                self.pipe.enable_lora()
                for mirror in self.mirrors:
                    mirror.transformer.enable_lora()
                if self.hotswap_rank is None:
                    self.pipe.set_adapters([loaded.adapter_name], adapter_weights=[ref.scale])
                    for mirror in self.mirrors:
                        mirror.transformer.set_adapters([loaded.adapter_name], weights=[ref.scale])
                else:
                    # Not set_adapters: it recomputes scalings from the slot's first adapter (see _load).
                    for transformer in [self.pipe.transformer, *(m.transformer for m in self.mirrors)]:
                        transformer.set_adapter(loaded.adapter_name)
                self._active = (ref.key, ref.scale)
                self._record_switch(started)
            return loaded

    @contextmanager
    def use(self, ref: AdapterRef | None) -> Iterator[LoadedAdapter | None]:
        """`with pool.use(ref): pipe(...)`: the adapter stays active, and alone, for the whole block."""
        with self._lock:
            yield self.activate(ref)

    def evict(self, key: str) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._evict(key)
            return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._evict(key)

    @property
    def loaded_keys(self) -> list[str]:
        """Loaded adapter keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counters = {k: (round(v, 3) if k.endswith("_ms_total") or k.endswith("_ms_last") else int(v))
                        for k, v in self._counters.items()}
            return counters | {
                "loaded": len(self._entries), "bytes": sum(e.tensor_bytes for e in self._entries.values()),
                "max_adapters": self.max_adapters, "max_bytes": self.max_bytes,
                "hotswap": self.hotswap_rank is not None,
                "active": None if self._active in (None, _UNKNOWN) else self._active[0],
            }

    # ---- loading and eviction --------------------------------------------------------------------------

    def _load(self, ref: AdapterRef, prepared: PreparedAdapter) -> _Entry:
        # Every check runs before anything is evicted or loaded: a refused file leaves the pipe as it was.
        mirrored = prepared.only("transformer")
        tensor_bytes = prepared.tensor_bytes + len(self.mirrors) * mirrored.tensor_bytes
        if tensor_bytes > self.max_bytes:
            raise AdapterError(f"{ref.uri}: {tensor_bytes} bytes of LoRA weights exceed the pool's "
                               f"{self.max_bytes} byte budget")
        if self.hotswap_rank is None:
            name, hotswap = ref.adapter_name, False
            self._make_room(tensor_bytes)
        else:
            name, hotswap = self._pick_slot(ref, prepared)
        self._active = _UNKNOWN
        scale = 1.0 if self.hotswap_rank is None else ref.scale
        try:
            elapsed_ms = load_prepared(self.pipe, prepared, name, hotswap=hotswap, scale=scale)
            try:
                for mirror in self.mirrors:
                    elapsed_ms += load_prepared(mirror, mirrored, name, hotswap=hotswap, scale=scale)
            except AdapterError:
                _delete_quietly([self.pipe.transformer, *(m.transformer for m in self.mirrors)], name)
                raise
        except AdapterError:
            if hotswap or name not in loaded_adapter_names(self.pipe):
                # diffusers drops a slot whose swap failed; its layers are no longer fixed.
                self._slot_layers.pop(name, None)
            raise
        if self.hotswap_rank is not None and not hotswap:
            self._slot_layers[name] = _layers(prepared)
        entry = _Entry(ref, name, prepared.sha256, prepared.max_rank, tensor_bytes)
        self._entries[ref.key] = entry
        self._counters["loads"] += 1
        self._counters["load_ms_last"] = elapsed_ms
        self._counters["load_ms_total"] += elapsed_ms
        return entry

    def _make_room(self, incoming_bytes: int) -> None:
        while self._entries and (
            len(self._entries) >= self.max_adapters
            or sum(e.tensor_bytes for e in self._entries.values()) + incoming_bytes > self.max_bytes
        ):
            self._evict(next(iter(self._entries)))

    def _pick_slot(self, ref: AdapterRef, prepared: PreparedAdapter) -> tuple[str, bool]:
        """Hot-swap mode: a never-used slot (plain load) or a compatible slot to swap into (evicting its owner)."""
        assert self.hotswap_rank is not None
        if prepared.max_rank > self.hotswap_rank:
            raise AdapterError(f"{ref.uri}: rank {prepared.max_rank} exceeds the pool's hot-swap rank "
                               f"{self.hotswap_rank}")
        if prepared.modules("text_encoder"):
            raise AdapterError(f"{ref.uri}: text-encoder LoRA layers cannot be hot-swapped")
        slots = [f"slot{i}" for i in range(self.max_adapters)]
        owners = {entry.name: key for key, entry in self._entries.items()}
        needed = _layers(prepared)
        fits = [s for s in slots if s in self._slot_layers and _covers(self._slot_layers[s], needed)]
        free_fits = [s for s in fits if s not in owners]
        if free_fits:
            return free_fits[0], True
        unused = [s for s in slots if s not in self._slot_layers]
        if unused:
            return unused[0], False
        # Least recently used owner first, as in the plain pool.
        for key, entry in list(self._entries.items()):
            if entry.name in fits:
                self._evict(key)
                return entry.name, True
        missing = sorted(
            f"{component}.{module}" for component, modules in needed.items() for module in modules
            if all(module not in self._slot_layers[slot].get(component, frozenset()) for slot in self._slot_layers)
        )
        example = f", e.g. {missing[0]}" if missing else ""
        raise AdapterError(f"{ref.uri}: targets layers no hot-swap slot has{example} (a slot's first adapter fixes "
                           "its layers; adapters must target those layers or fewer)")

    def _evict(self, key: str) -> None:
        entry = self._entries.pop(key)
        if self.hotswap_rank is None:
            for mirror in self.mirrors:
                mirror.transformer.delete_adapters(entry.name)
            self.pipe.delete_adapters(entry.name)
            self._active = _UNKNOWN
        elif self._active not in (None, _UNKNOWN) and self._active[0] == key:
            # The slot keeps its weights until the next swap; it must not stay active for another key.
            self._active = _UNKNOWN
        self._counters["evictions"] += 1
        log.info("adapter evicted", key=key, adapter=entry.name)

    def _record_switch(self, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._counters["switches"] += 1
        self._counters["switch_ms_last"] = elapsed_ms
        self._counters["switch_ms_total"] += elapsed_ms


def _architecture(transformer: Any) -> tuple[str, dict]:
    return type(transformer).__name__, {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}


def _delete_quietly(transformers: list, name: str) -> None:
    """Take a half-loaded adapter off every transformer that has it (diffusers drops a failed hot-swap itself)."""
    for transformer in transformers:
        if name in (getattr(transformer, "peft_config", None) or {}):
            try:
                transformer.delete_adapters(name)
            except Exception:  # noqa: BLE001 - already failing; the load error is the one to report
                log.warning("could not remove a half-loaded adapter", adapter=name)


def _layers(prepared: PreparedAdapter) -> dict[str, frozenset[str]]:
    return {component: prepared.modules(component) for component in {c for c, _ in prepared.targets}}


def _covers(slot: dict[str, frozenset[str]], needed: dict[str, frozenset[str]]) -> bool:
    return all(modules <= slot.get(component, frozenset()) for component, modules in needed.items())
