"""The native API: `POST /v1/txt2img` and `/v1/img2img`, BentoML API methods (service.py) whose
bodies are the engine's own request models. The answer is JSON with base64 images, seeds and
timings, or the bytes of one image when the client accepts only an image type (curl).

Errors come back in the one error shape (errors.py) with their own status; the status is set
on BentoML's context too, since BentoML applies the context's status to whatever a method returns.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import bentoml
from starlette.responses import JSONResponse, Response

from backends.api.edge import errors
from backends.api.jobs.answers import result_answer
from backends.sdxl_backend.errors import BackendError, InvalidRequest
from backends.sdxl_backend.protocol import GenerationRequest

if TYPE_CHECKING:
    from backends.api.composition.runtime import Runtime

# What the native routes answer besides 200, as the OpenAPI document declares them.
ERROR_STATUSES = (400, 401, 403, 404, 413, 415, 422, 429, 503, 504, 507)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


def wants_raw_image(accept: str | None) -> bool:
    return accept is not None and accept.split(",")[0].strip().startswith("image/")


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
