"""Images in JSON: the contract's image fields take raw bytes from Python and base64 (a data
URL too) from JSON, and the API documents show one small image that works when tried."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

# A 64x64 red PNG: the example input image of the API documents (one that works when tried).
TINY_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAYElEQVR4nO3PQQ0AIBDAMMC/sJOFCB4Nyapg27P+dnTAqwa0BrQGtAa0"
    "BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0C/RXAUhw4L3GAAAAAElFTkSuQmCC"
)


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


# Encoded image bytes: raw from Python, base64 (optionally a data URL) from JSON, which is
# what the schema says (OpenAPI's "byte" format), so that no client takes it for an upload.
ImageBytes = Annotated[
    bytes,
    BeforeValidator(_base64_to_bytes),
    WithJsonSchema({"type": "string", "format": "byte", "description": "an image, base64 (a data URL is fine)"}),
]
