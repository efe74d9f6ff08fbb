"""The request and answer of the image routes, shared by their two kinds of client: one request
model takes the union of moondream-station's and OpenAI's fields, one answer carries the union of
their response keys, and each client reads its own keys and ignores the rest."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.api.images.sizes import OPENAI_SIZES
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.image_bytes import ImageBytes
from backends.sdxl_backend.models.modes import MEMORY_MODES
from backends.sdxl_backend.models.schedulers import resolve_moondream_name
from backends.sdxl_backend.protocol import (
    MAX_CLIP_SKIP,
    MAX_SEED,
    FreeU,
    GenerationRequest,
    Outpaint,
    OutputFormat,
    Priority,
    PromptStyle,
    Refiner,
)
from backends.sdxl_backend.units import (
    MAX_CONTROLNETS,
    MAX_IP_ADAPTERS,
    MAX_LORAS,
    ControlNetUnit,
    IpAdapterUnit,
    LoraWeight,
)

SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
RECORDED_ONLY = ("quality", "style", "user", "safety_identifier", "moderation")


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"prompt": "a misty forest at dawn", "width": 512, "height": 512, "steps": 20, "seed": 3}
        },
    )

    prompt: str = Field(min_length=1)
    model: str | None = None
    negative_prompt: str | None = None
    # Size: moondream clients send width/height, OpenAI clients "WxH" (or "auto").
    width: int | None = None
    height: int | None = None
    size: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    scheduler: str | None = None
    clip_skip: int | None = Field(None, ge=1, le=MAX_CLIP_SKIP)  # as the native fields
    guidance_rescale: float | None = Field(None, ge=0, le=1)
    pag_scale: float = Field(0.0, ge=0, le=10)
    prompt_style: PromptStyle = "a1111"
    freeu: FreeU | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # Count: OpenAI's `n`, moondream's `num_images`.
    n: int | None = Field(None, ge=1)
    num_images: int | None = Field(None, ge=1)
    # img2img: moondream's base64 `image` and `strength`.
    image: ImageBytes | None = None
    strength: float = Field(0.75, gt=0, le=1)
    mask: ImageBytes | None = None  # inpainting: white repaints, black keeps
    outpaint: Outpaint | None = None  # {"left", "right", "top", "bottom", "fill"}: grow the image
    loras: list[LoraWeight] = Field([], max_length=MAX_LORAS)  # [{"id": ..., "weight": ...}] (GET /v1/loras)
    refiner: Refiner | None = None  # {"model": "sdxl-refiner", "switch_at": 0.8}
    controlnets: list[ControlNetUnit] = Field([], max_length=MAX_CONTROLNETS)  # as the native API's
    ip_adapters: list[IpAdapterUnit] = Field([], max_length=MAX_IP_ADAPTERS)  # likewise
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    partial_images: int | None = Field(None, ge=0, le=3)  # gpt-image's streamed previews: no stream, none sent
    stream: Literal[False] | None = None  # streaming answers are not offered
    priority: Priority = "normal"  # as the native API's: 'high' for the keys in SDXL_PRIORITY_KEYS
    # OpenAI fields without an SDXL meaning: accepted, recorded.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    moderation: str | None = None

    def to_generation_request(self, vram_mode: str | None) -> GenerationRequest:
        if vram_mode is not None and vram_mode not in MEMORY_MODES:
            raise InvalidRequest(f"X-VRAM-Mode: '{vram_mode}' is not one of {', '.join(MEMORY_MODES)}", "X-VRAM-Mode")
        width, height = self.width, self.height
        if self.size not in (None, "auto", *OPENAI_SIZES):  # (OpenAI's sizes: drawn_size, for the model)
            match = SIZE_PATTERN.match(self.size)
            if not match:
                raise InvalidRequest(f"size: '{self.size}' is not of the form WIDTHxHEIGHT, e.g. 1024x1024", "size")
            size = int(match[1]), int(match[2])
            if (width or size[0], height or size[1]) != size:
                raise InvalidRequest(f"size: '{self.size}' contradicts width={width}, height={height}", "size")
            width, height = size
        if self.n is not None and self.num_images is not None and self.n != self.num_images:
            raise InvalidRequest(f"n: n={self.n} contradicts num_images={self.num_images}", "n")
        if self.background == "transparent":
            raise InvalidRequest("background: SDXL draws opaque images; 'transparent' is not available", "background")
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or "",
            model=self.model,
            width=width,
            height=height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            n=self.n or self.num_images or 1,
            scheduler=self._scheduler(),
            clip_skip=self.clip_skip,
            guidance_rescale=self.guidance_rescale,
            pag_scale=self.pag_scale,
            prompt_style=self.prompt_style,
            freeu=self.freeu,
            output_format=self.output_format,
            quality=max(1, self.output_compression) if self.output_compression is not None else 90,
            image=self.image,
            strength=self.strength,
            mask=self.mask,
            outpaint=self.outpaint,
            vram_mode=vram_mode,
            loras=self.loras,
            refiner=self.refiner,
            controlnets=self.controlnets,
            ip_adapters=self.ip_adapters,
            priority=self.priority,
        )

    def _scheduler(self) -> str | None:
        if self.scheduler is None:
            return None
        return resolve_moondream_name(self.scheduler) or None  # unknown: the model's default

    def ignored(self) -> dict[str, Any]:
        """What the answer did not use: an unknown scheduler name, fields no dialect here knows."""
        unused = dict(self.model_extra or {})
        if self.scheduler is not None and self._scheduler() is None:
            unused["scheduler"] = self.scheduler
        return unused


class MoondreamRequest(ImageGenerationRequest):
    """moondream-station's handler reads the fields it knows and ignores the rest: so here."""

    model_config = ConfigDict(extra="allow")


class ImageEditForm(ImageGenerationRequest):
    """OpenAI's edit and variation forms: the generation fields, as multipart text fields."""

    prompt: str = ""
    input_fidelity: str | None = None  # OpenAI's; no SDXL meaning


class ImageGenerationAnswer(BaseModel):
    created: int
    size: str = Field(description="The size drawn, WIDTHxHEIGHT (OpenAI's sizes are drawn at SDXL's nearest).")
    output_format: str
    data: list[dict[str, Any]] = Field(description="OpenAI clients: b64_json or url, and the seed, per image.")
    images: list[str] = Field(description="moondream clients: base64 images (or links).")
    image: str = Field(description="The first of `images`.")
    stats: dict[str, Any] = Field(description="Model, seeds, size, steps, timings, memory mode...")
