"""The OpenAI Images API: `POST /v1/images/generations` (JSON), `/v1/images/edits` and
`/v1/images/variations` (multipart, as the `openai` package sends them), and the links that
`response_format: "url"` hands out (`GET /v1/images/files/{image_id}`). As strict as OpenAI's: an
unknown parameter is a 400, and out-of-memory is 507."""

from __future__ import annotations

import io
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors
from backends.api.images.protocol import ImageEditForm, ImageGenerationAnswer, ImageGenerationRequest
from backends.api.images.serving import answering_model, generation_answer
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.images import decode_image
from backends.sdxl_backend.generation.masks import mask_from_alpha
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.units import IpAdapterUnit

router = APIRouter(tags=["OpenAI Images"])
VramModeHeader = Annotated[str | None, Header(description="high, balanced or low")]


@router.post(
    "/v1/images/generations",
    response_model=ImageGenerationAnswer,
    responses=errors.responses(400, 401, 403, 404, 413, 422, 429, 503, 504, 507),
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
                            "description": "the image (repeated, or as image[]: the first is edited, the "
                            "others become image prompts when an IP-Adapter fits the model)",
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
    """The multipart form the `openai` package sends: `image` (or `image[]`, repeated: those
    after the first become image prompts), `mask`, and the other fields as text. Uploads are
    bounded by SDXL_MAX_BODY_BYTES at the edge."""
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
        fields["mask"] = await anyio.to_thread.run_sync(alpha_mask_png, await mask.read(), runtime.limits)
    try:
        edit = ImageEditForm(**fields, image=uploads[0])
    except ValidationError as exc:
        error = errors.validation_error(exc.errors())[1]["error"]
        raise InvalidRequest(error["message"], error["param"]) from None
    if len(uploads) > 1:
        edit.ip_adapters = await image_prompts(uploads[1:], edit, request, runtime)
    return edit


async def image_prompts(
    pictures: list[bytes], form: ImageEditForm, request: Request, runtime: Runtime
) -> list[IpAdapterUnit]:
    """The images after the first (gpt-image's reference images), as image prompts: one for
    each IP-Adapter that fits the model, in the order served."""
    model = await answering_model(form.model, request, runtime)
    fitting = [adapter.id for adapter in runtime.ip_adapters.values() if model in runtime.models_fitting(adapter)]
    if len(pictures) > len(fitting):
        raise InvalidRequest(
            f"image[]: the {len(pictures)} image(s) after the first become image prompts, one for each IP-Adapter "
            f"that fits model '{model}', and it has {len(fitting)} (GET /v1/ip-adapters)",
            "image[]",
        )
    return [IpAdapterUnit(id=adapter_id, image=picture) for adapter_id, picture in zip(fitting, pictures)]


def alpha_mask_png(data: bytes, limits: Limits) -> bytes:
    buffer = io.BytesIO()
    mask_from_alpha(decode_image(data, limits, "mask", mode="RGBA")).save(buffer, format="PNG")
    return buffer.getvalue()


@router.post(
    "/v1/images/edits",
    response_model=ImageGenerationAnswer,
    openapi_extra=MULTIPART_BODY,
    responses=errors.responses(400, 401, 403, 404, 413, 422, 429, 503, 504, 507),
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
    responses=errors.responses(400, 401, 403, 404, 413, 422, 429, 503, 504, 507),
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
