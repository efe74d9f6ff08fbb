"""What the service serves, as it read the store (or the bento) at its start: the models, and
the adapters, control and upscale models requests name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from backends.sdxl_backend.models.schedulers import ModelSampling, model_sampling
from backends.sdxl_backend.protocol import ModelDefaults, SamplingProfile


@dataclass(frozen=True)
class ServedModel:
    id: str
    path: Path
    version: str  # the BentoML store version
    description: str
    defaults: ModelDefaults

    @cached_property
    def sampling(self) -> ModelSampling:
        """What its UNet predicts, and whether it was trained with zero-terminal SNR."""
        return model_sampling(self.path)


@dataclass(frozen=True)
class ServedAdapter:
    """A LoRA, a ControlNet, an embedding, an IP-Adapter or an upscaler, named by requests."""

    id: str
    path: Path
    # the UNet architecture it was made for (loras.py); an embedding's text encoder widths
    # (embeddings.py); "any" for an upscaler
    fits: str
    description: str
    sampling: SamplingProfile | None = None  # a LoRA's sampling profile (its catalog entry's)


@dataclass(frozen=True)
class SideModels:
    """The models a request names beside its own, as the service read them at its start."""

    loras: Sequence[ServedAdapter] = ()
    controlnets: Sequence[ServedAdapter] = ()
    embeddings: Sequence[ServedAdapter] = ()
    ip_adapters: Sequence[ServedAdapter] = ()
    upscalers: Sequence[ServedAdapter] = ()

    def by_kind(self) -> dict[str, Sequence[ServedAdapter]]:
        """Each kind under the name the logs give it."""
        return {
            "LoRAs": self.loras,
            "ControlNets": self.controlnets,
            "embeddings": self.embeddings,
            "IP-Adapters": self.ip_adapters,
            "upscalers": self.upscalers,
        }
