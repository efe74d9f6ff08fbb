"""moondream-station's `POST /v1/generate`, which the gallery frontend speaks: as lenient as the
server it imitates. It takes the fork's scheduler names (a name it cannot map falls back to the
model's default), accepts fields it does not know (listed in `stats.ignored`), and answers a
final out-of-memory with the fork's 500 "CUDA out of memory" (the gallery retries in low-memory
mode on exactly that)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors
from backends.api.images.protocol import ImageGenerationAnswer, MoondreamRequest
from backends.api.images.serving import generation_answer
from backends.sdxl_backend.errors import OutOfMemory

router = APIRouter(tags=["moondream-station"])
VramModeHeader = Annotated[str | None, Header(description="high, balanced or low")]


@router.post(
    "/v1/generate",
    response_model=ImageGenerationAnswer,
    responses=errors.responses(400, 401, 403, 404, 413, 422, 429, 500, 503, 504),
)
async def moondream_generate(
    body: MoondreamRequest,
    request: Request,
    runtime: Annotated[Runtime, Depends(runtime_of)],
    x_vram_mode: VramModeHeader = None,
) -> JSONResponse:
    """moondream-station's generation route. `image` makes it img2img. X-Inference-Time is in
    milliseconds here, as the gallery reads it."""
    try:
        return await generation_answer(body, request, runtime, x_vram_mode, inference_ms=True)
    except OutOfMemory as exc:
        return JSONResponse(
            errors.error_body(f"CUDA out of memory: {exc.message}", "out_of_memory", code="out_of_memory"), 500
        )
