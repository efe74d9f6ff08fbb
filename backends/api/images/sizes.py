"""OpenAI's model ids and sizes, as the clients hard-wired to them send them (n8n offers only
`dall-e-2`, `dall-e-3` and `gpt-image-1`; LibreChat fixes `gpt-image-1`): each id is answered
by the model `SDXL_OPENAI_MODEL` names (default: the caller's default model) unless an alias
maps it, and each of OpenAI's sizes is drawn at the SDXL size of the nearest aspect."""

from __future__ import annotations

import math

from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.protocol import ModelDefaults

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini")
OPENAI_SIZES = ("256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792")
# The sizes SDXL was trained at (its aspect buckets, about a megapixel each).
SDXL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344))


def served_model(asked: str | None, aliases: dict[str, str], openai_model: str | None) -> str | None:
    """The model that answers `asked`: OpenAI's ids (not mapped by an alias) are
    `SDXL_OPENAI_MODEL`'s, or the caller's default (None); any other id is itself."""
    if asked in OPENAI_MODELS and asked not in aliases:
        return openai_model
    return asked


def drawn_size(size: str, defaults: ModelDefaults, limits: Limits) -> tuple[int, int]:
    """One of OpenAI's sizes as drawn here: SDXL's trained size of the nearest aspect, at the
    model's own scale (SDXL's sizes are for a model made at 1024x1024; one made at 512, the
    turbo, draws them at half), its shorter side at least SDXL_MIN_SIDE."""
    width, height = (int(side) for side in size.split("x"))
    bucket = min(SDXL_SIZES, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))
    scale = max(math.sqrt(defaults.width * defaults.height) / 1024, limits.min_side / min(bucket))
    return tuple(max(8, math.floor(side * scale / 8 + 0.5) * 8) for side in bucket)  # type: ignore[return-value]
