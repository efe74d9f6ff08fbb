"""The native API: `POST /v1/txt2img` and `/v1/img2img`, BentoML API methods (service.py) whose
bodies are the engine's own request models. The answer is JSON with base64 images, seeds and
timings, or the bytes of one image when the client accepts only an image type (curl).

Errors come back in the one error shape (errors.py) with their own status; the status is set
on BentoML's context too, since BentoML applies the context's status to whatever a method returns.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

import bentoml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response

from backends.api import errors
from backends.sdxl_backend.errors import BackendError, InvalidRequest
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult, PromptReading, Timings

if TYPE_CHECKING:
    from backends.api.runtime import Runtime

# What the native routes answer besides 200, as the OpenAPI document declares them.
ERROR_STATUSES = (400, 401, 403, 404, 413, 415, 422, 429, 503, 504, 507)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


class NativeImage(BaseModel):
    b64_json: str = Field(description="The encoded image, base64.")
    seed: int
    media_type: str
    width: int
    height: int


class GenerationAnswer(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    model: str = Field(description="The model that served (an alias resolved).")
    images: list[NativeImage]
    parameters: dict[str, Any] = Field(description="The request as it ran, every default filled in.")
    timings: Timings
    vram_mode: str = Field(description="The memory mode that served, after any out-of-memory retry.")
    out_of_memory_in: list[str] = Field(description="Memory modes that ran out of memory first (recovered).")
    batch_images: int = Field(
        description="Images in the pipeline call that made these: more than the request's "
        "own when it ran batched with other requests (SDXL_MAX_BATCH)."
    )
    prompt_reading: dict[str, PromptReading] = Field(
        description="What the text encoders read of `prompt` and `negative_prompt`: tokens, and chunks of 75."
    )
    device: str = Field(description="The device that ran it ('cuda:1', 'cpu'; SDXL_DEVICES).")


def wants_raw_image(accept: str | None) -> bool:
    return accept is not None and accept.split(",")[0].strip().startswith("image/")


def result_answer(result: GenerationResult, created: int) -> GenerationAnswer:
    return GenerationAnswer(
        created=created,
        model=result.model,
        images=[
            NativeImage(
                b64_json=base64.b64encode(image.data).decode(),
                seed=image.seed,
                media_type=image.media_type,
                width=image.width,
                height=image.height,
            )
            for image in result.images
        ],
        parameters=result.request.model_dump(),
        timings=result.timings,
        vram_mode=result.vram_mode,
        out_of_memory_in=result.out_of_memory_in,
        batch_images=result.batch_images,
        prompt_reading=result.prompt_reading,
        device=result.device or "",  # (always set by the device worker that ran it)
    )


async def answer(runtime: Runtime, request: GenerationRequest, ctx: bentoml.Context) -> Response:
    """Run `request` for a native route and shape the answer (or the error)."""
    try:
        raw = wants_raw_image(ctx.request.headers.get("accept"))
        if raw and request.n != 1:
            raise InvalidRequest("n: a raw image answer (Accept: image/*) holds one image; ask for JSON", "n")
        result = await runtime.run(request, ctx.request)
    except BackendError as exc:
        status, body = errors.backend_error(exc)
        ctx.response.status_code = status
        return JSONResponse(body, status_code=status, headers=errors.error_headers(exc))
    ctx.response.status_code = 200
    result_headers = runtime.result_headers(result)
    if raw:
        image = result.images[0]
        return Response(image.data, media_type=image.media_type, headers=result_headers)
    return JSONResponse(result_answer(result, int(time.time())).model_dump(), headers=result_headers)
