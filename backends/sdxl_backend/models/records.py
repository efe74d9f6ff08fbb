"""What the model manager holds: the models it may serve (`ModelSource`, read from the store
before any load), the records of those loaded (`LoadedModel`, `LoadedSideModel`: what each
costs the budget, who is using it), and what it needs of each kind of side model (`SIDE_KINDS`)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from backends.sdxl_backend.device import Placement
from backends.sdxl_backend.models.controlnets import ControlNetSource
from backends.sdxl_backend.models.ip_adapters import (
    ImagePromptModel,
    IpAdapterSource,
    load_image_prompt_model,
    stored_bytes,
)
from backends.sdxl_backend.models.loras import model_unet_signature
from backends.sdxl_backend.models.pipelines import Pipelines, component_bytes, load_controlnet, loading_alone
from backends.sdxl_backend.models.schedulers import ModelSampling, model_sampling
from backends.sdxl_backend.models.upscalers import UpscalerSource, load_upscaler
from backends.sdxl_backend.prompts.embeddings import model_text_signature
from backends.sdxl_backend.protocol import ModelDefaults

SideSource = ControlNetSource | IpAdapterSource | UpscalerSource


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
    def sampling(self) -> ModelSampling:
        """What its UNet predicts and whether it was trained with zero-terminal SNR."""
        return model_sampling(self.path)

    @cached_property
    def text_layers(self) -> int:
        """The layers of its smaller text encoder: how far clip skip can count back."""
        configs = [self.path / folder / "config.json" for folder in ("text_encoder", "text_encoder_2")]
        return min(json.loads(config.read_text())["num_hidden_layers"] for config in configs if config.exists())

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
    """A ControlNet, an IP-Adapter with its image encoder, or an upscaler, loaded beside the models."""

    source: SideSource
    module: torch.nn.Module | ImagePromptModel | Any = field(repr=False)  # (Any: spandrel's descriptor)
    bytes: int
    load_s: float
    in_use: int = 0

    def describe(self) -> dict[str, Any]:
        return {"id": self.source.id, "bytes": self.bytes, "in_use": self.in_use > 0, "load_s": round(self.load_s, 3)}


@dataclass(frozen=True)
class SideKind:
    """What the manager needs of a kind of side model: its name, its size once loaded in a
    dtype (from the file headers), how it loads, and its list in `status()`."""

    name: str
    size: Callable[[Path, torch.dtype], int]
    load: Callable[[Path, Placement], Any]
    listed_as: str


SIDE_KINDS = {
    ControlNetSource: SideKind("ControlNet", component_bytes, load_controlnet, "controlnets"),
    IpAdapterSource: SideKind("IP-Adapter", stored_bytes, load_image_prompt_model, "ip_adapters"),
    UpscalerSource: SideKind("upscaler", component_bytes, loading_alone(load_upscaler), "upscalers"),
}
