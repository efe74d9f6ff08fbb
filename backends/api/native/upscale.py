"""Upscales: `POST /v1/upscale` (a BentoML API method, service.py) and what A1111's extras call.

An upscale is not a job (yet): like A1111's extras, its client waits for it, and at most
SDXL_MAX_UPSCALES calls wait or run at once in a process. It is prepared off the
event loop (the image decoded, every field checked: a bad one is a 400 at once), then handed to
a device thread as a call, which runs it between two jobs (one upscale at a time per device:
the jobs take their turns between them). The client hanging up, or SDXL_TIMEOUT_SECONDS
passing, stops it at its next tile.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import TYPE_CHECKING

import anyio
import bentoml
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from backends.api.edge import errors
from backends.api.edge.hangups import cancelled_on_hangup
from backends.api.native.generation import wants_raw_image
from backends.sdxl_backend.errors import BackendError, QueueFull, TimedOut
from backends.sdxl_backend.upscale_protocol import UpscaleRequest, UpscaleResult, UpscaleTimings

if TYPE_CHECKING:
    from backends.api.composition.runtime import Runtime


class UpscaleAnswer(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    upscaler: str
    b64_json: str = Field(description="The encoded image, base64.")
    media_type: str
    width: int
    height: int
    passes: int = Field(description="Runs of the model (a size beyond its scale takes more); 0 for lanczos.")
    tiles: int = Field(description="Pieces the model ran on, over all passes (SDXL_UPSCALE_TILE).")
    timings: UpscaleTimings
    device: str


async def run_upscale(runtime: Runtime, request: UpscaleRequest, http: Request | None) -> UpscaleResult:
    """Checked here, run on a device thread; `Cancelled` when the client of `http` leaves,
    `TimedOut` after SDXL_TIMEOUT_SECONDS, and the awaiting task cancelled (an MCP call, which
    has no connection of its own to watch) stops it too: the device stops at its next tile. At
    most SDXL_MAX_UPSCALES wait or run at once (each holds its decoded image): past them, 429."""
    most = runtime.settings.max_upscales
    if runtime.upscales >= most:
        raise QueueFull(f"{runtime.upscales} upscales are waiting or running; at most {most} (SDXL_MAX_UPSCALES)", 5)
    runtime.upscales += 1
    try:
        return await _run(runtime, request, http)
    finally:
        runtime.upscales -= 1


async def _run(runtime: Runtime, request: UpscaleRequest, http: Request | None) -> UpscaleResult:
    prepared = await anyio.to_thread.run_sync(runtime.engine.upscaling.prepare, request)
    stop, timeout_s = threading.Event(), runtime.settings.timeout_seconds

    async def on_a_device() -> UpscaleResult:
        async with runtime.devices.turn_for_a_call() as device:
            call = device.thread.call(lambda: device.engine.upscaling.run(prepared, stop.is_set))
            result = await asyncio.wrap_future(call)
            result.device = device.name
            return result

    try:
        work = asyncio.wait_for(on_a_device(), timeout_s)
        return await (cancelled_on_hangup(http, work) if http is not None else work)
    except TimeoutError:
        raise TimedOut(f"the upscale took longer than {timeout_s:g} s (SDXL_TIMEOUT_SECONDS)") from None
    finally:
        stop.set()  # (a call still running stops at its next tile; one not started never starts)


async def answer(runtime: Runtime, request: UpscaleRequest, ctx: bentoml.Context) -> Response:
    """The native route's answer: JSON, or the image itself for a client that accepts only an image."""
    try:
        result = await run_upscale(runtime, request, ctx.request)
    except BackendError as exc:
        status, body = errors.backend_error(exc)
        ctx.response.status_code = status
        return JSONResponse(body, status_code=status, headers=errors.error_headers(exc))
    ctx.response.status_code = 200
    if wants_raw_image(ctx.request.headers.get("accept")):
        return Response(result.data, media_type=result.media_type)
    return JSONResponse(
        UpscaleAnswer(
            created=int(time.time()),
            b64_json=base64.b64encode(result.data).decode(),
            device=result.device or "",
            **result.model_dump(exclude={"data", "device"}),
        ).model_dump()
    )
