"""The dialect of `POST /v1/generate` and `POST /v1/images/generations`, OpenAI's multipart
`/v1/images/edits` and `/v1/images/variations`, and the links that `response_format: "url"`
hands out (`GET /v1/images/files/{image_id}`).

Two kinds of client send to these routes: moondream-station style clients (the gallery
frontend) and OpenAI Images API clients (the `openai` package). One request model takes the
union of their fields and one answer carries the union of their response keys; each client
reads its own keys and ignores the rest. Every accepted field is used, except OpenAI's
`quality`, `style`, `user`, `safety_identifier` and `moderation`, which have no SDXL meaning:
they are accepted so OpenAI clients work, and recorded in `stats`.

Each route is as lenient as the server it imitates. `/v1/generate` is moondream-station's: it
takes the fork's scheduler names (a name it cannot map falls back to the model's default),
accepts fields it does not know, and answers a final out-of-memory with the fork's 500
"CUDA out of memory" (the gallery retries in low-memory mode on exactly that); what it did
not use is listed in `stats.ignored`. `/v1/images/generations` is OpenAI's: an unknown
parameter is a 400, and out-of-memory is 507.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.api import errors
from backends.api.runtime import Runtime, runtime_of
from backends.sdxl_backend.errors import InvalidRequest, OutOfMemory
from backends.sdxl_backend.images import decode_image
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.masks import mask_from_alpha
from backends.sdxl_backend.modes import MEMORY_MODES
from backends.sdxl_backend.protocol import (
    MAX_CONTROLNETS,
    MAX_LORAS,
    MAX_SEED,
    ControlNetUnit,
    GenerationRequest,
    GenerationResult,
    ImageBytes,
    LoraWeight,
    OutputFormat,
    Refiner,
)
from backends.sdxl_backend.schedulers import resolve_moondream_name

SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
RECORDED_ONLY = ("quality", "style", "user", "safety_identifier", "moderation")


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"prompt": "a misty forest at dawn", "width": 512, "height": 512, "steps": 20, "seed": 3}
        },
    )

    prompt: str = Field(min_length=1)
    model: str | None = None
    negative_prompt: str | None = None
    # Size: moondream clients send width/height, OpenAI clients "WxH" (or "auto").
    width: int | None = None
    height: int | None = None
    size: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    scheduler: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # Count: OpenAI's `n`, moondream's `num_images`.
    n: int | None = Field(None, ge=1)
    num_images: int | None = Field(None, ge=1)
    # img2img: moondream's base64 `image` and `strength`.
    image: ImageBytes | None = None
    strength: float = Field(0.75, gt=0, le=1)
    mask: ImageBytes | None = None  # inpainting: white repaints, black keeps
    loras: list[LoraWeight] = Field([], max_length=MAX_LORAS)  # [{"id": ..., "weight": ...}] (GET /v1/loras)
    refiner: Refiner | None = None  # {"model": "sdxl-refiner", "switch_at": 0.8}
    controlnets: list[ControlNetUnit] = Field([], max_length=MAX_CONTROLNETS)  # as the native API's
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    stream: Literal[False] | None = None  # streaming answers are not offered
    # OpenAI fields without an SDXL meaning: accepted, recorded.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    moderation: str | None = None

    def to_generation_request(self, vram_mode: str | None) -> GenerationRequest:
        if vram_mode is not None and vram_mode not in MEMORY_MODES:
            raise InvalidRequest(f"X-VRAM-Mode: '{vram_mode}' is not one of {', '.join(MEMORY_MODES)}", "X-VRAM-Mode")
        width, height = self.width, self.height
        if self.size not in (None, "auto"):
            match = SIZE_PATTERN.match(self.size)
            if not match:
                raise InvalidRequest(f"size: '{self.size}' is not of the form WIDTHxHEIGHT, e.g. 1024x1024", "size")
            size = int(match[1]), int(match[2])
            if (width or size[0], height or size[1]) != size:
                raise InvalidRequest(f"size: '{self.size}' contradicts width={width}, height={height}", "size")
            width, height = size
        if self.n is not None and self.num_images is not None and self.n != self.num_images:
            raise InvalidRequest(f"n: n={self.n} contradicts num_images={self.num_images}", "n")
        if self.background == "transparent":
            raise InvalidRequest("background: SDXL draws opaque images; 'transparent' is not available", "background")
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or "",
            model=self.model,
            width=width,
            height=height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            n=self.n or self.num_images or 1,
            scheduler=self._scheduler(),
            output_format=self.output_format,
            quality=max(1, self.output_compression) if self.output_compression is not None else 90,
            image=self.image,
            strength=self.strength,
            mask=self.mask,
            vram_mode=vram_mode,
            loras=self.loras,
            refiner=self.refiner,
            controlnets=self.controlnets,
        )

    def _scheduler(self) -> str | None:
        if self.scheduler is None:
            return None
        return resolve_moondream_name(self.scheduler) or None  # unknown: the model's default

    def ignored(self) -> dict[str, Any]:
        """What the answer did not use: an unknown scheduler name, fields no dialect here knows."""
        unused = dict(self.model_extra or {})
        if self.scheduler is not None and self._scheduler() is None:
            unused["scheduler"] = self.scheduler
        return unused


class MoondreamRequest(ImageGenerationRequest):
    """moondream-station's handler reads the fields it knows and ignores the rest: so here."""

    model_config = ConfigDict(extra="allow")


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
    return {"created": created, "data": data, "images": encoded, "image": encoded[0], "stats": stats}


class ImageGenerationAnswer(BaseModel):
    created: int
    data: list[dict[str, Any]] = Field(description="OpenAI clients: b64_json or url, and the seed, per image.")
    images: list[str] = Field(description="moondream clients: base64 images (or links).")
    image: str = Field(description="The first of `images`.")
    stats: dict[str, Any] = Field(description="Model, seeds, size, steps, timings, memory mode...")


router = APIRouter(tags=["moondream-station and OpenAI Images"])


VramModeHeader = Annotated[str | None, Header(description="high, balanced or low")]


@router.post(
    "/v1/generate",
    response_model=ImageGenerationAnswer,
    responses=errors.responses(400, 401, 404, 413, 422, 429, 500, 503, 504),
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


@router.post(
    "/v1/images/generations",
    response_model=ImageGenerationAnswer,
    responses=errors.responses(400, 401, 404, 413, 422, 429, 503, 504, 507),
)
async def generate(
    body: ImageGenerationRequest,
    request: Request,
    runtime: Annotated[Runtime, Depends(runtime_of)],
    x_vram_mode: VramModeHeader = None,
) -> JSONResponse:
    """The OpenAI Images API (and, through the route above, moondream-station's): the union
    of both request shapes in, the union of both answers out."""
    return await generation_answer(body, request, runtime, x_vram_mode)


async def generation_answer(
    body: ImageGenerationRequest,
    request: Request,
    runtime: Runtime,
    x_vram_mode: str | None,
    inference_ms: bool = False,
) -> JSONResponse:
    """Both routes' work: the generation, then the answer in both shapes."""
    result = await runtime.run(body.to_generation_request(x_vram_mode), request)
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


class ImageEditForm(ImageGenerationRequest):
    """OpenAI's edit and variation forms: the generation fields, as multipart text fields."""

    prompt: str = ""
    input_fidelity: str | None = None  # OpenAI's; no SDXL meaning


MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "the image (repeated: the first is used)",
                        },
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "edits: a PNG whose fully transparent pixels mark the area to repaint",
                        },
                        "prompt": {"type": "string"},
                        "n": {"type": "integer"},
                        "size": {"type": "string"},
                        "response_format": {"type": "string"},
                        "model": {"type": "string"},
                    },
                }
            }
        },
    }
}


async def read_edit_form(request: Request, runtime: Runtime, with_prompt: bool) -> ImageEditForm:
    """The multipart form the `openai` package sends: `image` (or `image[]`, repeated), `mask`,
    and the other fields as text. Uploads are bounded by SDXL_MAX_BODY_BYTES at the edge."""
    try:
        form = await request.form(max_files=16, max_fields=64)
    except Exception:
        raise InvalidRequest("body: expected a multipart/form-data upload", "image") from None
    uploads = [
        await item.read() for key in ("image", "image[]") for item in form.getlist(key) if not isinstance(item, str)
    ]
    if not uploads:
        raise InvalidRequest("image: required (a file upload)", "image")
    fields: dict[str, Any] = {
        key: value
        for key, value in form.multi_items()
        if isinstance(value, str) and key not in ("image", "image[]", "mask")
    }
    if not with_prompt and "prompt" in fields:
        raise InvalidRequest("prompt: variations take no prompt", "prompt")
    mask = form.get("mask")
    if mask is not None and not isinstance(mask, str):
        # OpenAI marks the area to edit with transparency; the engine takes white-repaints masks.
        fields["mask"] = await anyio.to_thread.run_sync(alpha_mask_png, await mask.read(), runtime.engine.limits)
    try:
        return ImageEditForm(**fields, image=uploads[0])
    except ValidationError as exc:
        error = errors.validation_error(exc.errors())[1]["error"]
        raise InvalidRequest(error["message"], error["param"]) from None


def alpha_mask_png(data: bytes, limits: Limits) -> bytes:
    buffer = io.BytesIO()
    mask_from_alpha(decode_image(data, limits, "mask", mode="RGBA")).save(buffer, format="PNG")
    return buffer.getvalue()


@router.post(
    "/v1/images/edits",
    response_model=ImageGenerationAnswer,
    openapi_extra=MULTIPART_BODY,
    responses=errors.responses(400, 401, 404, 413, 422, 429, 503, 504, 507),
)
async def edit_image(request: Request, runtime: Annotated[Runtime, Depends(runtime_of)]) -> JSONResponse:
    """OpenAI's image edit: img2img from `image` and `prompt`; with `mask`, inpainting of its
    transparent area (strength 1.0: the area is drawn anew, as OpenAI's edits are)."""
    form = await read_edit_form(request, runtime, with_prompt=True)
    if not form.prompt:
        raise InvalidRequest("prompt: required for an edit", "prompt")
    if form.mask is not None and "strength" not in form.model_fields_set:
        form.strength = 1.0
    return await generate(form, request, runtime)


@router.post(
    "/v1/images/variations",
    response_model=ImageGenerationAnswer,
    openapi_extra=MULTIPART_BODY,
    responses=errors.responses(400, 401, 404, 413, 422, 429, 503, 504, 507),
)
async def image_variations(request: Request, runtime: Annotated[Runtime, Depends(runtime_of)]) -> JSONResponse:
    """OpenAI's variations: img2img of `image` with no prompt, at strength 0.6 unless given."""
    form = await read_edit_form(request, runtime, with_prompt=False)
    if "strength" not in form.model_fields_set:
        form.strength = 0.6
    return await generate(form, request, runtime)


@router.get(
    "/v1/images/files/{image_id}",
    response_class=Response,
    responses={
        200: {
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("image/png", "image/jpeg", "image/webp")
            },
            "description": "The image",
        },
        **errors.responses(404, 410, 503),
    },
)
async def kept_image(image_id: str, runtime: Annotated[Runtime, Depends(runtime_of)]) -> Response:
    """An image answered with response_format "url", while it is kept."""
    image = await anyio.to_thread.run_sync(runtime.kept_images.get, image_id)
    if image is not None:
        return Response(image.data, media_type=image.media_type)
    if await anyio.to_thread.run_sync(runtime.kept_images.expired, image_id):
        return JSONResponse(errors.error_body("this image has expired", "gone", code="expired"), 410)
    return JSONResponse(errors.error_body("no such image", "not_found", code="not_found"), 404)
