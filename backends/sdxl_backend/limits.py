"""Request limits, checked before any model work. Each one can be set by environment variable."""

from __future__ import annotations

import os

from pydantic import BaseModel


class Limits(BaseModel):
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_guidance_scale: float = 30.0
    max_images: int = 10
    max_prompt_chars: int = 4000
    max_input_image_bytes: int = 20 * 1024 * 1024
    max_input_image_pixels: int = 4096 * 4096

    @classmethod
    def from_env(cls) -> "Limits":
        """`SDXL_MAX_SIDE`, `SDXL_MAX_PIXELS`, ...: the field name, upper-cased, after `SDXL_`."""
        values = {}
        for name, field in cls.model_fields.items():
            raw = os.environ.get(f"SDXL_{name.upper()}")
            if raw is not None:
                values[name] = field.annotation(raw)
        return cls(**values)
