"""What the model manager holds: the models it may serve (`ModelSource`, read from the store
before any load) and the records of those loaded (`LoadedModel`, `LoadedSideModel`: what each
costs the budget, who is using it)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .controlnets import ControlNetSource
from .embeddings import model_text_signature
from .ip_adapters import ImagePromptModel, IpAdapterSource
from .loras import model_unet_signature
from .pipelines import Pipelines
from .protocol import ModelDefaults


@dataclass(frozen=True)
class ModelSource:
    """A servable model: its id, where its files are, and its defaults."""

    id: str
    path: Path
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    @cached_property
    def img2img_only(self) -> bool:
        """An image-to-image pipeline (the refiner), read from the store before any load."""
        index = json.loads((self.path / "model_index.json").read_text())
        return index.get("_class_name") == "StableDiffusionXLImg2ImgPipeline"

    @cached_property
    def unet_signature(self) -> str:
        """Its UNet's architecture, which a LoRA must have been trained on (loras.py)."""
        return model_unet_signature(self.path)

    @cached_property
    def text_signature(self) -> str:
        """Its text encoders' widths, which an embedding must have (embeddings.py)."""
        return model_text_signature(self.path)


@dataclass
class LoadedModel:
    source: ModelSource
    pipelines: Pipelines
    bytes: int  # weights in the target dtype, what the budget counts
    load_s: float
    last_used: float = field(default_factory=time.time)
    in_use: int = 0
    # loaded adapters' bytes, least recently used first
    loras: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def describe(self) -> dict[str, Any]:
        """As `/v1/system/status` lists it."""
        return {
            "id": self.source.id,
            "bytes": self.bytes,
            "mode": self.pipelines.mode,
            "in_use": self.in_use > 0,
            "last_used": self.last_used,
            "load_s": round(self.load_s, 3),
            "loras": list(self.loras),
        }


@dataclass
class LoadedSideModel:
    """A ControlNet, or an IP-Adapter with its image encoder, loaded beside the models."""

    source: ControlNetSource | IpAdapterSource
    module: torch.nn.Module | ImagePromptModel = field(repr=False)
    bytes: int
    load_s: float
    in_use: int = 0

    def describe(self) -> dict[str, Any]:
        return {"id": self.source.id, "bytes": self.bytes, "in_use": self.in_use > 0, "load_s": round(self.load_s, 3)}
