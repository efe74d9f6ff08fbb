"""The only code that loads, places and frees pipelines.

A model is a diffusers directory in the model store. Loading it builds one set of
components on the target device and two pipelines over them (text-to-image and
image-to-image), so img2img costs no second copy of the weights.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from .device import Placement
from .errors import UnknownModel
from .protocol import ModelDefaults

logger = logging.getLogger("sdxl_backend")


@dataclass(frozen=True)
class ModelSource:
    """A servable model: its id, where its files are, and its defaults."""

    id: str
    path: Path
    defaults: ModelDefaults = field(default_factory=ModelDefaults)


@dataclass
class LoadedModel:
    source: ModelSource
    txt2img: StableDiffusionXLPipeline | None  # None for img2img-only models (the refiner)
    img2img: StableDiffusionXLImg2ImgPipeline
    # The stored scheduler config: every request's scheduler starts from it, never from the
    # previous request's scheduler, whose variant options would carry over.
    scheduler_config: dict
    load_s: float
    last_used: float = field(default_factory=time.time)


def _memory_in_use(placement: Placement) -> int:
    if placement.device.type == "cuda":
        return torch.cuda.memory_allocated(placement.device)
    return psutil.Process().memory_info().rss


def load_pipelines(source: ModelSource, placement: Placement) -> LoadedModel:
    """Read a store directory onto the device in the target dtype."""
    started = time.perf_counter()
    before = _memory_in_use(placement)
    # Hub imports keep the fp16 file names of the repository; diffusers reads them as a variant.
    variant = "fp16" if any(source.path.glob("*/*.fp16.safetensors")) else None
    base = DiffusionPipeline.from_pretrained(
        source.path,
        dtype=placement.dtype,
        variant=variant,
        use_safetensors=True,
        local_files_only=True,
    ).to(placement.device)
    base.set_progress_bar_config(disable=True)
    if isinstance(base, StableDiffusionXLPipeline):
        txt2img = base
        img2img = StableDiffusionXLImg2ImgPipeline(
            **base.components, force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt
        )
        img2img.set_progress_bar_config(disable=True)
    elif isinstance(base, StableDiffusionXLImg2ImgPipeline):
        txt2img, img2img = None, base
    else:
        raise ValueError(f"{source.path} holds a {type(base).__name__}, not an SDXL pipeline")
    load_s = time.perf_counter() - started
    logger.info(
        "loaded model %s on %s in %.2f s (%.0f MiB)",
        source.id, placement.describe(), load_s, (_memory_in_use(placement) - before) / 2**20,
    )
    return LoadedModel(source, txt2img, img2img, dict(base.scheduler.config), load_s)


class ModelManager:
    """Which models can be served, which are loaded, and exclusive use of the device."""

    def __init__(self, sources: list[ModelSource], placement: Placement, aliases: dict[str, str] | None = None):
        self.sources = {source.id: source for source in sources}
        self.placement = placement
        # Ids that clients are hard-wired to, served by another model: {"sdxl-realism": "juggernaut-xl"}.
        self.aliases = dict(aliases or {})
        for alias, target in self.aliases.items():
            if target not in self.sources:
                raise ValueError(f"alias {alias}={target}: {target} is not served (served: {', '.join(self.sources)})")
        self._loaded: dict[str, LoadedModel] = {}
        self._device_lock = threading.Lock()

    def source(self, model_id: str) -> ModelSource:
        """The model that serves `model_id`, following an alias unless a model has that id."""
        model_id = model_id if model_id in self.sources else self.aliases.get(model_id, model_id)
        if model_id not in self.sources:
            raise UnknownModel(model_id, sorted([*self.sources, *self.aliases]))
        return self.sources[model_id]

    def is_loaded(self, model_id: str) -> bool:
        return self.source(model_id).id in self._loaded

    @contextmanager
    def use(self, model_id: str) -> Iterator[tuple[LoadedModel, float]]:
        """Hold the device with `model_id` loaded; yields the model and the seconds spent
        loading it for this call (0 when it was already resident)."""
        source = self.source(model_id)
        with self._device_lock:
            loaded = self._loaded.get(source.id)
            load_s = 0.0
            if loaded is None:
                loaded = self._loaded[source.id] = load_pipelines(source, self.placement)
                load_s = loaded.load_s
            loaded.last_used = time.time()
            yield loaded, load_s

    def unload(self, model_ids: list[str] | None = None) -> list[str]:
        """Free the given loaded models (default: all); returns the ids freed."""
        with self._device_lock:
            unloaded = sorted(m for m in self._loaded if model_ids is None or m in model_ids)
            for model_id in unloaded:
                del self._loaded[model_id]
            self.release_cached_memory()
        for model_id in unloaded:
            logger.info("unloaded model %s", model_id)
        return unloaded

    def release_cached_memory(self) -> None:
        gc.collect()
        if self.placement.device.type == "cuda":
            torch.cuda.empty_cache()
