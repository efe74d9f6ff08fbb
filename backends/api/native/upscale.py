"""Upscales: `POST /v1/upscale` (a BentoML API method, service.py), answered as JSON or as the
image itself. The upscale is a job (`Runtime.upscale`): it takes its turn in the queue, shows in
`/v1/jobs` while its client waits, and can run on any replica of a shared queue."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import bentoml
from starlette.responses import JSONResponse, Response

from backends.api.edge import errors
from backends.api.jobs.answers import upscale_answer
from backends.api.native.generation import wants_raw_image
from backends.sdxl_backend.errors import BackendError
from backends.sdxl_backend.upscale_protocol import UpscaleRequest

if TYPE_CHECKING:
    from backends.api.composition.runtime import Runtime


async def answer(runtime: Runtime, request: UpscaleRequest, ctx: bentoml.Context) -> Response:
    """The native route's answer: JSON, or the image itself for a client that accepts only an image."""
    try:
        result = await runtime.upscale(request, ctx.request)
    except BackendError as exc:
        status, body = errors.backend_error(exc)
        ctx.response.status_code = status
        return JSONResponse(body, status_code=status, headers=errors.error_headers(exc))
    ctx.response.status_code = 200
    if wants_raw_image(ctx.request.headers.get("accept")):
        return Response(result.data, media_type=result.media_type)
    return JSONResponse(upscale_answer(result, int(time.time())).model_dump())
