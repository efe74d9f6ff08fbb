"""The model catalog (`catalog.toml`) as typed entries."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from backends.sdxl_backend.protocol import ModelDefaults, SamplingProfile

CATALOG_FILE = Path(__file__).with_name("catalog.toml")
# The kinds that take one file from their repo (an IP-Adapter: its image encoder's folder too).
SINGLE_FILE_KINDS = ("lora", "embedding", "ip-adapter", "upscaler")


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    description: str
    # "pipeline": a servable SDXL model; "vae": a component that replaces every served model's
    # VAE when SDXL_VAE names it; "lora": an adapter a request names in `loras`; "controlnet":
    # a control model a request names in `controlnets`; "embedding": a textual-inversion
    # embedding a prompt names; "ip-adapter": an image prompt model a request names in `ip_adapters`;
    # "upscaler": an upscale model (ESRGAN and its kin) for /v1/upscale and the hires fix.
    kind: Literal["pipeline", "vae", "lora", "controlnet", "embedding", "ip-adapter", "upscaler"] = "pipeline"
    weights: str | None = None  # a LoRA's, an embedding's, an IP-Adapter's or an upscaler's file in its repo
    encoder: str | None = None  # an IP-Adapter's image encoder: its folder in the repo
    repo: str | None = None  # None: built locally (tiny-sdxl)
    unet: tuple[str, str] | None = None  # (repo, file) replacing the repo's UNet weights
    licence: str | None = None
    # A pipeline's sampling facts, where its repo's scheduler config does not state them
    # (written into the stored model's at import, as `--prediction` and `--zero-snr` do).
    prediction: Literal["epsilon", "v"] | None = None
    zero_snr: bool | None = None
    defaults: ModelDefaults = ModelDefaults()
    sampling: SamplingProfile | None = None  # a few-step LoRA's: what fills a request's open fields

    @model_validator(mode="after")
    def _profiles_are_loras(self) -> CatalogEntry:
        if self.sampling is not None and self.kind != "lora":
            raise ValueError(f"{self.id}: only a LoRA has a sampling profile")
        return self

    @model_validator(mode="after")
    def _single_files_are_named(self) -> CatalogEntry:
        if self.weights is None and self.repo is not None and self.kind in SINGLE_FILE_KINDS:
            raise ValueError(f"{self.id}: a {self.kind} from the hub names its file (weights)")
        return self

    @property
    def weights_file(self) -> str:
        """A single-file kind's file in its repo (named: checked when the catalog is read)."""
        assert self.weights is not None, self.id
        return self.weights


@cache
def load_catalog() -> dict[str, CatalogEntry]:
    """Entries in file order, which is the order of preference for the default model."""
    raw = tomllib.loads(CATALOG_FILE.read_text())
    return {model_id: CatalogEntry(id=model_id, **fields) for model_id, fields in raw.items()}


def defaults_for(model_id: str) -> ModelDefaults:
    """A catalog model's defaults; a model imported under another id gets SDXL's."""
    entry = load_catalog().get(model_id)
    return entry.defaults if entry else ModelDefaults()
