"""The work of every image route: the generation, then the answer in both clients' shapes, with
links instead of base64 for `response_format: "url"`."""

from __future__ import annotations

import base64
import time
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from backends.api.composition.runtime import Runtime
from backends.api.images.protocol import RECORDED_ONLY, ImageGenerationRequest
from backends.api.images.sizes import OPENAI_SIZES, drawn_size, served_model
from backends.sdxl_backend.protocol import GenerationResult


def render(
    body: ImageGenerationRequest, result: GenerationResult, created: int, urls: list[str] | None
) -> dict[str, Any]:
    """`created` and `data` for OpenAI clients; `images`, `image` and `stats` for moondream
    clients. With `urls` (response_format "url") the images are links, not base64."""
    request = result.request
    if urls is None:
        encoded = [base64.b64encode(image.data).decode() for image in result.images]
        data = [{"b64_json": b64, "seed": image.seed} for b64, image in zip(encoded, result.images)]
    else:
        encoded = urls
        data = [{"url": url, "seed": image.seed} for url, image in zip(urls, result.images)]
    stats = {
        "model": result.model,
        "requested_model": body.model,
        "seeds": result.seeds,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "scheduler": request.scheduler,
        "mode": "inpaint" if result.inpainting else "img2img" if result.img2img else "txt2img",
        "vram_mode": result.vram_mode,
        "out_of_memory_in": result.out_of_memory_in,
        **({"strength": request.strength} if result.img2img else {}),
        **result.timings.model_dump(),
        "prompt_reading": {name: reading.model_dump() for name, reading in result.prompt_reading.items()},
        **{f: getattr(body, f) for f in RECORDED_ONLY if getattr(body, f)},
        **({"ignored": ignored} if (ignored := body.ignored()) else {}),
    }
    return {
        "created": created,
        "data": data,
        "images": encoded,
        "image": encoded[0],
        "stats": stats,
        # (as gpt-image answers: the size drawn, which for OpenAI's sizes is SDXL's nearest)
        "size": f"{request.width}x{request.height}",
        "output_format": request.output_format,
    }


async def answering_model(asked: str | None, request: Request, runtime: Runtime) -> str:
    """The served model that answers a request naming `asked`: OpenAI's ids mapped (sizes.py),
    else the caller's default (off the event loop: it may be in Redis); an unknown one is a
    404 naming it."""
    model = served_model(asked, runtime.aliases, runtime.settings.openai_model)
    if model is None:
        model = await anyio.to_thread.run_sync(runtime.default_model_for, runtime.owner(request))
    return runtime.model_source(model).id


async def generation_answer(
    body: ImageGenerationRequest,
    request: Request,
    runtime: Runtime,
    x_vram_mode: str | None,
    inference_ms: bool = False,
) -> JSONResponse:
    """Both routes' work: the generation, then the answer in both shapes."""
    generation = body.to_generation_request(x_vram_mode)
    generation.model = served_model(body.model, runtime.aliases, runtime.settings.openai_model)
    if body.size in OPENAI_SIZES and body.width is None and body.height is None:
        generation.model = await answering_model(body.model, request, runtime)  # (read once, here)
        defaults = runtime.model_source(generation.model).defaults
        generation.width, generation.height = drawn_size(body.size, defaults, runtime.limits)
    result = await runtime.run(generation, request)
    urls = None
    if body.response_format == "url":
        base, kept, extension = runtime.base_url(request), runtime.kept_images, result.request.output_format
        # (off the event loop: the kept images may be in Redis)
        ids = [
            await anyio.to_thread.run_sync(kept.put, image.data, image.media_type, extension) for image in result.images
        ]
        urls = [f"{base}/v1/images/files/{image_id}" for image_id in ids]
    return JSONResponse(
        render(body, result, int(time.time()), urls), headers=runtime.result_headers(result, inference_ms)
    )
