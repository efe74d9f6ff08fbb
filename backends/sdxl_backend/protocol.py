"""The one internal contract: every dialect builds a `GenerationRequest` and renders a
`GenerationResult`. Fields left `None` are filled from the model's defaults by the engine."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

OutputFormat = Literal["png", "jpeg", "webp"]
# Memory policy of a request: "low" frees the model after the request.
VramMode = Literal["high", "balanced", "low"]
MAX_SEED = 2**32 - 1


def _base64_to_bytes(value: Any) -> Any:
    """JSON carries images as base64, with or without a `data:image/...;base64,` prefix."""
    if not isinstance(value, str):
        return value
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


# Encoded image bytes: raw from Python, base64 (optionally a data URL) from JSON.
ImageBytes = Annotated[bytes, BeforeValidator(_base64_to_bytes)]


class ModelDefaults(BaseModel):
    """What a model uses when a request leaves a field out (the catalog's per-model settings)."""

    model_config = ConfigDict(extra="forbid")

    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance_scale: float = 6.0
    scheduler: str = "euler"
    timestep_spacing: str | None = None


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    model: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1)
    scheduler: str | None = None
    output_format: OutputFormat = "png"
    quality: int = Field(90, ge=1, le=100)
    # img2img: the input image (PNG, JPEG, WebP...) and how much of it to repaint.
    image: ImageBytes | None = Field(None, exclude=True, repr=False)
    strength: float = Field(0.75, gt=0, le=1)
    vram_mode: VramMode | None = None


class GeneratedImage(BaseModel):
    data: bytes = Field(repr=False)
    media_type: str
    seed: int
    width: int
    height: int


class Timings(BaseModel):
    load_s: float
    inference_s: float
    encode_s: float


class GenerationResult(BaseModel):
    model: str
    images: list[GeneratedImage]
    # The request as it ran: every default filled in, the base seed chosen.
    request: GenerationRequest
    timings: Timings
    vram_mode: str  # the memory mode that produced the images
    out_of_memory_in: list[str] = []  # modes that ran out of memory first (recovered)

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]
