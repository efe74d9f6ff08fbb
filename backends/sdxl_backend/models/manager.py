"""The only code that loads, places and frees pipelines.

Loaded models are kept in least-recently-used order under a memory budget: loading one that
does not fit evicts the least recently used models that no request is using. Side models
(ControlNets, IP-Adapters, upscalers) are loaded beside them (shared by every model they fit),
counted in the budget, and kept up to `max_loaded_controlnets`, `max_loaded_ip_adapters` and
`max_loaded_upscalers`. Each model runs in a memory mode (pipelines.py) chosen per request.
Every load and unload runs on the device thread (device_thread.py), generations too; the lock
here guards the loaded set against the other threads that read it (status, listings).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import psutil

from backends.sdxl_backend.device import (
    Placement,
    allocated_memory,
    free_cached_memory,
    memory_in_use,
    out_of_memory_as_error,
    placement_status,
)
from backends.sdxl_backend.device_thread import TORCH_WORK
from backends.sdxl_backend.errors import DeviceUnavailable, UnknownModel
from backends.sdxl_backend.models.controlnets import ControlNetSource
from backends.sdxl_backend.models.fast_paths import FastPaths
from backends.sdxl_backend.models.ip_adapters import IpAdapterSource
from backends.sdxl_backend.models.loras import LORA_FILE, LoraSource
from backends.sdxl_backend.models.modes import MemoryPolicy
from backends.sdxl_backend.models.pipelines import (
    Pipelines,
    apply_memory_mode,
    load_pipelines,
    loading_alone,
    set_vae_tiling,
    weights_bytes,
)
from backends.sdxl_backend.models.records import SIDE_KINDS, LoadedModel, LoadedSideModel, ModelSource, SideSource
from backends.sdxl_backend.models.upscalers import UpscalerSource
from backends.sdxl_backend.units import LoraWeight

logger = logging.getLogger(__name__)
GiB = 2**30
T = TypeVar("T")


class ModelManager:
    """Which models can be served, which are loaded where, in which mode; memory in one place."""

    def __init__(
        self,
        sources: list[ModelSource],
        placement: Placement,
        *,  # (the rest by name: fifteen positions would be read wrong)
        aliases: dict[str, str] | None = None,
        policy: MemoryPolicy | None = None,
        fast_paths: FastPaths = FastPaths(),
        vae: Path | None = None,  # a VAE directory used in place of each model's own
        loras: Sequence[LoraSource] = (),
        max_loaded_loras: int = 8,  # adapters kept loaded per model; the least recently used go first
        controlnets: Sequence[ControlNetSource] = (),
        max_loaded_controlnets: int = 2,  # ControlNets kept loaded; the least recently used go first
        ip_adapters: Sequence[IpAdapterSource] = (),
        max_loaded_ip_adapters: int = 2,  # IP-Adapters kept loaded; the least recently used go first
        upscalers: Sequence[UpscalerSource] = (),
        max_loaded_upscalers: int = 1,  # upscalers kept loaded; the least recently used go first
        # Runs an action on the device thread and returns its result (`DeviceThread.run`): the
        # idle timer's unload goes there. Default: in the calling thread (no device thread).
        on_device: Callable[[Callable[[], None]], None] = lambda action: action(),
    ):
        self.sources = {source.id: source for source in sources}
        self.placement = placement
        self.policy = policy or MemoryPolicy()
        self.fast_paths = fast_paths
        self.vae = vae
        self.loras = {lora.id: lora for lora in loras}
        self.max_loaded_loras = max_loaded_loras
        self.controlnets = {controlnet.id: controlnet for controlnet in controlnets}
        self.ip_adapters = {adapter.id: adapter for adapter in ip_adapters}
        self.upscalers = {upscaler.id: upscaler for upscaler in upscalers}
        self.max_loaded = {
            ControlNetSource: max_loaded_controlnets,
            IpAdapterSource: max_loaded_ip_adapters,
            UpscalerSource: max_loaded_upscalers,
        }
        self.on_device = on_device
        total = memory_in_use(placement)[1]  # (on the CPU: the host's memory)
        self.budget = self.policy.budget or total - max(GiB, total // 10)
        # Ids that clients are hard-wired to, served by another model: {"sdxl-realism": "juggernaut-xl"}.
        self.aliases = dict(aliases or {})
        for alias, target in self.aliases.items():
            if target not in self.sources:
                raise ValueError(f"alias {alias}={target}: {target} is not served (served: {', '.join(self.sources)})")
        self.side_sources: dict[str, SideSource] = {**self.controlnets, **self.ip_adapters, **self.upscalers}
        self.loads: dict[str, int] = dict.fromkeys([*self.sources, *self.side_sources], 0)
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._side_models: OrderedDict[str, LoadedSideModel] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._last_activity = time.monotonic()
        logger.info(
            "memory budget %.2f GiB of %.2f GiB; default mode %s",
            self.budget / GiB,
            total / GiB,
            self.policy.default_mode,
        )
        self._closing = threading.Event()
        if self.policy.idle_unload_s:
            threading.Thread(
                target=self._unload_when_idle, args=(self.policy.idle_unload_s,), name="sdxl-idle-unload", daemon=True
            ).start()

    def source(self, model_id: str) -> ModelSource:
        """The model that serves `model_id`, following an alias unless a model has that id."""
        model_id = model_id if model_id in self.sources else self.aliases.get(model_id, model_id)
        if model_id not in self.sources:
            raise UnknownModel(model_id, sorted([*self.sources, *self.aliases]))
        return self.sources[model_id]

    def is_loaded(self, model_id: str) -> bool:
        return self.source(model_id).id in self._loaded

    @contextmanager
    def use(self, model_id: str, mode: str, pixels: int) -> Iterator[tuple[Pipelines, float]]:
        """The model's pipelines, loaded and placed for `mode`, held in use for the block;
        yields them and the seconds spent loading for this call (0 when resident)."""
        source = self.source(model_id)
        with self._lock:
            self._last_activity = time.monotonic()
            loaded, load_s = self._loaded.get(source.id), 0.0
            if loaded is not None:
                loaded.in_use += 1
        if loaded is None:
            # Only the engine's device thread loads, so no second load of the same model can
            # start meanwhile; the lock is not held through the load, so status stays quick.
            loaded = self._load(source, mode)
            load_s = loaded.load_s
        with self._lock:
            self._loaded.move_to_end(source.id)
            loaded.last_used = time.time()
        try:
            if loaded.pipelines.mode != mode:
                logger.info("model %s: memory mode %s -> %s", source.id, loaded.pipelines.mode, mode)
                self.out_of_memory_as_error(
                    lambda: apply_memory_mode(loaded.pipelines, mode, self.placement),
                    f"out of memory placing {source.id} in mode {mode}",
                )
            large = pixels > self.policy.tiling_pixels
            if large and mode == "high":
                set_vae_tiling(loaded.pipelines, True)
            try:
                yield loaded.pipelines, load_s
            finally:
                if large and mode == "high":
                    set_vae_tiling(loaded.pipelines, False)
        finally:
            with self._lock:
                loaded.in_use -= 1
                self._last_activity = time.monotonic()

    def apply_loras(self, model_id: str, pipelines: Pipelines, requested: list[LoraWeight]) -> float:
        """Make exactly `requested` active on the model (loading those it lacks, none when empty);
        returns the seconds spent loading. Switching never reloads the model: adapters stay
        loaded beside it, up to `max_loaded_loras`, and inactive ones do not act."""
        owner = pipelines.owner
        with self._lock:
            loaded = self._loaded[self.source(model_id).id]
        started, loaded_now = time.perf_counter(), False
        for wanted in requested:
            lora = self.loras[wanted.id]
            if lora.id not in loaded.loras:
                TORCH_WORK.note("load")
                self.out_of_memory_as_error(
                    functools.partial(
                        loading_alone(owner.load_lora_weights),
                        str(lora.path),
                        weight_name=LORA_FILE,
                        adapter_name=lora.adapter_name,
                    ),
                    f"out of memory loading LoRA {lora.id}",
                )
                with self._lock:
                    loaded.loras[lora.id] = lora.file.stat().st_size
                    loaded.bytes += loaded.loras[lora.id]
                loaded_now = True
                logger.info("loaded LoRA %s into %s in %.2f s", lora.id, model_id, time.perf_counter() - started)
            with self._lock:  # (status() lists them from other threads)
                loaded.loras.move_to_end(lora.id)
        wanted_ids = {wanted.id for wanted in requested}
        for victim in [lora_id for lora_id in loaded.loras if lora_id not in wanted_ids]:
            if len(loaded.loras) <= self.max_loaded_loras:
                break
            owner.delete_adapters([self.loras[victim].adapter_name])
            with self._lock:
                loaded.bytes -= loaded.loras.pop(victim)
        if requested:
            owner.enable_lora()
            owner.set_adapters([self.loras[w.id].adapter_name for w in requested], [w.weight for w in requested])
        elif loaded.loras:
            owner.disable_lora()
        return time.perf_counter() - started if loaded_now else 0.0

    @contextmanager
    def use_side_models(self, model_ids: list[str]) -> Iterator[tuple[list, float]]:
        """The side models named (`ControlNetModel`s, `ImagePromptModel`s, spandrel's upscalers),
        loaded, held in use for the block; yields them and the seconds spent loading for this call."""
        held: list[LoadedSideModel] = []
        load_s = 0.0
        try:
            for model_id in model_ids:
                with self._lock:
                    loaded = self._side_models.get(model_id)
                    if loaded is not None:
                        loaded.in_use += 1
                if loaded is None:
                    loaded = self._load_side_model(self.side_sources[model_id])
                    load_s += loaded.load_s
                held.append(loaded)
                with self._lock:
                    self._side_models.move_to_end(model_id)
            with self._lock:  # each kind keeps its own number loaded
                for victim in [m for m in self._side_models.values() if not m.in_use]:
                    kind = type(victim.source)
                    if sum(type(m.source) is kind for m in self._side_models.values()) > self.max_loaded[kind]:
                        self._free_side_model(victim.source.id)
            yield [loaded.module for loaded in held], load_s
        finally:
            with self._lock:
                for loaded in held:
                    loaded.in_use -= 1
                self._last_activity = time.monotonic()

    def _load_side_model(self, source: SideSource) -> LoadedSideModel:
        """Load a side model under the budget, registered as in use."""
        kind = SIDE_KINDS[type(source)]
        size = kind.size(source.path, self.placement.dtype)
        self._make_room(size, source.id)
        TORCH_WORK.note("load")
        started = time.perf_counter()
        module = self.out_of_memory_as_error(
            lambda: kind.load(source.path, self.placement), f"out of memory loading {kind.name} {source.id}"
        )
        loaded = LoadedSideModel(source, module, size, time.perf_counter() - started, in_use=1)
        self.loads[source.id] += 1
        logger.info(
            "loaded %s %s on %s in %.2f s (%.0f MiB)",
            kind.name,
            source.id,
            self.placement.describe(),
            loaded.load_s,
            size / 2**20,
        )
        with self._lock:
            self._side_models[source.id] = loaded
        return loaded

    def _used(self) -> int:
        return sum(m.bytes for m in self._loaded.values()) + sum(c.bytes for c in self._side_models.values())

    def _make_room(self, size: int, for_id: str) -> None:
        """Evict the least recently used models no request is using until `size` more bytes fit
        the budget (a warning when even that is not enough)."""
        with self._lock:
            used = self._used()
            for victim in [m for m in self._loaded.values() if not m.in_use]:  # least recently used first
                if used + size <= self.budget:
                    break
                logger.info(
                    "evicting %s (%.2f GiB) to make room for %s (%.2f GiB) under the %.2f GiB budget",
                    victim.source.id,
                    victim.bytes / GiB,
                    for_id,
                    size / GiB,
                    self.budget / GiB,
                )
                self._free(victim.source.id)
                used -= victim.bytes
        if used + size > self.budget:
            logger.warning(
                "%s (%.2f GiB) does not fit the budget beside the models in use; loading it anyway", for_id, size / GiB
            )

    def _load(self, source: ModelSource, mode: str) -> LoadedModel:
        """Make room under the budget, load, and register the model as in use."""
        size = weights_bytes(source.path, self.placement.dtype)
        self._make_room(size, source.id)
        TORCH_WORK.note("load")
        started, before = time.perf_counter(), allocated_memory(self.placement)
        pipelines = self.out_of_memory_as_error(
            lambda: load_pipelines(source.path, self.placement, mode, self.fast_paths, self.vae),
            f"out of memory loading {source.id} ({size / GiB:.2f} GiB) in mode {mode}",
        )
        load_s = time.perf_counter() - started
        self.loads[source.id] += 1
        logger.info(
            "loaded model %s on %s in mode %s in %.2f s (%.0f MiB measured, %.0f MiB of weights)",
            source.id,
            self.placement.describe(),
            mode,
            load_s,
            (allocated_memory(self.placement) - before) / 2**20,
            size / 2**20,
        )
        loaded = LoadedModel(source, pipelines, size, load_s, in_use=1)
        with self._lock:
            self._loaded[source.id] = loaded
        return loaded

    def unload(self, model_ids: list[str] | None = None) -> list[str]:
        """Free the given loaded models and side models (default: all) that no request is using."""
        with self._lock:
            every: list[tuple[str, LoadedModel | LoadedSideModel]] = [*self._loaded.items(), *self._side_models.items()]
            freed = [m for m, loaded in every if (model_ids is None or m in model_ids) and not loaded.in_use]
            for model_id in freed:
                if model_id in self._side_models:
                    self._free_side_model(model_id)
                else:
                    self._free(model_id)
        return sorted(freed)

    def _free(self, model_id: str) -> None:
        TORCH_WORK.note("unload")
        del self._loaded[model_id]
        self.release_cached_memory()
        logger.info("unloaded model %s", model_id)

    def _free_side_model(self, model_id: str) -> None:
        TORCH_WORK.note("unload")
        del self._side_models[model_id]
        self.release_cached_memory()
        logger.info("unloaded %s", model_id)

    def out_of_memory_as_error(self, action: Callable[[], T], message: str) -> T:
        return out_of_memory_as_error(action, message, self.placement.device)

    def release_cached_memory(self) -> None:
        free_cached_memory(self.placement.device)

    def close(self) -> None:
        """Stop the idle timer and free every model."""
        self._closing.set()
        self.unload()

    def _unload_when_idle(self, idle_s: float) -> None:
        while not self._closing.wait(min(5.0, idle_s / 2)):
            if self._loaded or self._side_models:
                try:
                    self.on_device(lambda: self._unload_if_idle(idle_s))
                except DeviceUnavailable:  # the device thread has stopped: nothing runs any more
                    return

    def _unload_if_idle(self, idle_s: float) -> None:
        with self._lock:
            idle_for = time.monotonic() - self._last_activity
            if (self._loaded or self._side_models) and idle_for >= idle_s:
                logger.info("idle for %.0f s: freeing loaded models", idle_for)
                self.unload()

    def status(self) -> dict:
        memory = memory_in_use(self.placement)
        with self._lock:
            loaded = [m.describe() for m in reversed(self._loaded.values())]  # most recently used first
            side_models = list(reversed(self._side_models.values()))
        listed = {
            kind.listed_as: [m.describe() for m in side_models if isinstance(m.source, source_type)]
            for source_type, kind in SIDE_KINDS.items()
        }
        return {
            **placement_status(self.placement),
            "memory": {
                "total": memory[1],
                "used": memory[0],
                "free": memory[1] - memory[0],
                "budget": self.budget,
                "models": sum(m["bytes"] for m in [*loaded, *(m for of_kind in listed.values() for m in of_kind)]),
                "process_rss": psutil.Process().memory_info().rss,
            },
            "default_mode": self.policy.default_mode,
            "fast_paths": asdict(self.fast_paths),
            "loaded": loaded,
            **listed,
            "loads": dict(self.loads),
        }
