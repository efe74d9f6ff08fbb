"""The native API: the body is a `GenerationRequest` as JSON; the answer is JSON with
base64 images, or the raw bytes of one image when the client accepts only an image type."""

from __future__ import annotations

import base64
from typing import Any

from backends.sdxl_backend.protocol import GenerationResult


def wants_raw_image(accept: str | None) -> bool:
    return bool(accept) and accept.split(",")[0].strip().startswith("image/")


def result_body(result: GenerationResult, created: int) -> dict[str, Any]:
    return {
        "created": created,
        "model": result.model,
        "images": [
            {
                "b64_json": base64.b64encode(image.data).decode(),
                "seed": image.seed,
                "media_type": image.media_type,
                "width": image.width,
                "height": image.height,
            }
            for image in result.images
        ],
        "parameters": result.request.model_dump(),
        "timings": result.timings.model_dump(),
        "vram_mode": result.vram_mode,
        "out_of_memory_in": result.out_of_memory_in,
    }
