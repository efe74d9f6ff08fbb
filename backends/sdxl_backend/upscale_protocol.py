"""The upscale contract: an `UpscaleRequest` in (`POST /v1/upscale`, A1111's extras, MCP's
tool), an `UpscaleResult` out; `upscaling.py` checks and runs it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from backends.sdxl_backend.image_bytes import TINY_PNG, ImageBytes
from backends.sdxl_backend.protocol import OutputFormat


class UpscaleRequest(BaseModel):
    """An image made larger by an upscale model (or resized): `POST /v1/upscale`, A1111's extras."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"image": TINY_PNG, "upscaler": "lanczos", "scale": 2}}
    )

    image: ImageBytes = Field(exclude=True, repr=False, description="The image to upscale, base64.")
    upscaler: str = Field(description="A served upscale model (GET /v1/upscalers), or 'lanczos' (a plain resize).")
    scale: float = Field(2.0, ge=1, le=8, description="Output over input size, when width and height are not given.")
    width: int | None = Field(None, ge=1, description="Output width; with height alone, the aspect ratio is kept.")
    height: int | None = Field(None, ge=1, description="Output height; with width alone, the aspect ratio is kept.")
    output_format: OutputFormat = Field("png", description="Encoding of the image.")
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality.")


class UpscaleTimings(BaseModel):
    load_s: float  # the upscaler loaded for this request (0 when it was loaded)
    upscale_s: float
    encode_s: float


class UpscaleResult(BaseModel):
    upscaler: str
    data: bytes = Field(repr=False)
    media_type: str
    width: int
    height: int
    passes: int  # runs of the model (a target beyond its scale takes more), 0 for lanczos
    tiles: int  # pieces it ran in, over all passes
    timings: UpscaleTimings
    device: str | None = None
