"""Request limits, checked before a request is queued (the service sets them from `SDXL_*`)."""

from __future__ import annotations

from pydantic import BaseModel


class Limits(BaseModel):
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_guidance_scale: float = 30.0
    max_images: int = 10
    max_prompt_chars: int = 4000
    max_prompt_chunks: int = 20  # chunks of 75 tokens a prompt may make (1,500 tokens: above any real prompt)
    max_input_image_bytes: int = 20 * 1024 * 1024
    max_input_image_pixels: int = 4096 * 4096
    max_upscale_pixels: int = 4096 * 4096  # an upscale's output (4x of 1024 x 1024)
