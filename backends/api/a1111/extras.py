"""A1111's Extras tab: `/sdapi/v1/extra-single-image` and `/extra-batch-images` (upscaling), and
the names its clients give upscalers (`upscaler_1`, `hr_upscaler`, `/sdapi/v1/upscalers`).

A1111 names an upscale model by its title ("R-ESRGAN 4x+", "4x-UltraSharp"); here a client may
send that title or the model's id, in any case. "None" as `upscaler_1` leaves the image as it
is (as A1111 does); "Lanczos" resizes. `upscaler_2` with `extras_upscaler_2_visibility` blends a
second upscale over the first, as A1111 does. Face restoration (`gfpgan_visibility`,
`codeformer_visibility`) is not here and is refused by name.
"""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from backends.api.a1111.protocol import refuse_what_is_on
from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.images import UNREAD, encode_image, open_client_image
from backends.sdxl_backend.image_bytes import TINY_PNG, ImageBytes
from backends.sdxl_backend.upscale_protocol import UpscaleRequest

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
UPSCALE_ERRORS = errors.responses(400, 401, 409, 413, 422, 503, 504, 507)
# The catalog's upscalers by the titles A1111 lists them under.
TITLES = {"realesrgan-x4plus": "R-ESRGAN 4x+", "4x-ultrasharp": "4x-UltraSharp"}


def upscaler_id(name: str) -> str:
    """The upscaler an A1111 name means here: 'lanczos', a catalog title's id, or the name as an id."""
    wanted = name.strip().lower()
    by_title = {title.lower(): upscaler for upscaler, title in TITLES.items()}
    return by_title.get(wanted, wanted)


def upscaler_listing(upscalers: dict[str, int]) -> list[dict[str, Any]]:
    """/sdapi/v1/upscalers: "None", "Lanczos" and the served models (`upscalers`: id -> scale)."""
    plain = [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in ("None", "Lanczos")
    ]
    return plain + [
        {
            "name": TITLES.get(upscaler, upscaler),
            "model_name": upscaler,
            "model_path": None,
            "model_url": None,
            "scale": scale,
        }
        for upscaler, scale in upscalers.items()
    ]


class ExtrasRequest(BaseModel):
    """The fields of A1111's extras requests (what `webuiapi` sends, most at their defaults)."""

    model_config = ConfigDict(extra="allow")

    resize_mode: int = Field(0, ge=0, le=1)  # 0: by upscaling_resize; 1: to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True  # resize_mode 1: cut the overflow (centred); else the covering size stays
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleRequest(ExtrasRequest):
    model_config = ConfigDict(json_schema_extra={"example": {"image": TINY_PNG, "upscaler_1": "Lanczos"}})

    image: ImageBytes


class ExtrasBatchImage(BaseModel):
    data: ImageBytes
    name: str = ""


class ExtrasBatchRequest(ExtrasRequest):
    model_config = ConfigDict(
        json_schema_extra={"example": {"imageList": [{"data": TINY_PNG, "name": "one"}], "upscaler_1": "Lanczos"}}
    )

    imageList: list[ExtrasBatchImage] = Field(min_length=1, max_length=16)


@router.post("/extra-single-image", responses=UPSCALE_ERRORS)
async def extra_single_image(body: ExtrasSingleRequest, request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    return {"html_info": "", "image": await _extras(body, body.image, request, runtime)}


@router.post("/extra-batch-images", responses=UPSCALE_ERRORS)
async def extra_batch_images(body: ExtrasBatchRequest, request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    return {"html_info": "", "images": [await _extras(body, item.data, request, runtime) for item in body.imageList]}


async def _extras(body: ExtrasRequest, image: bytes, request: Request, runtime: Runtime) -> str:
    """One image through A1111's upscale step, base64 PNG."""
    refuse_what_is_on(body.model_extra)
    for face_field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, face_field) > 0:
            raise InvalidRequest(f"{face_field}: face restoration is not available on this server", face_field)
    if body.upscaler_1.strip().lower() == "none":
        return base64.b64encode(image).decode()
    size = {"scale": body.upscaling_resize}
    if body.resize_mode == 1:  # A1111's: by the ratio that covers the size, the aspect kept; cropped below
        width, height = _source_size(image)
        cover = max(body.upscaling_resize_w / width, body.upscaling_resize_h / height)
        size = {"width": round(width * cover), "height": round(height * cover)}
    first = await _upscaled(runtime, request, image, "upscaler_1", body.upscaler_1, size)
    blended = body.upscaler_2.strip().lower() != "none" and body.extras_upscaler_2_visibility > 0
    second = await _upscaled(runtime, request, image, "upscaler_2", body.upscaler_2, size) if blended else None
    cropped = body.resize_mode == 1 and body.upscaling_crop
    if second is None and not cropped:
        return base64.b64encode(first).decode()

    def finish() -> bytes:  # (off the event loop: decoding and encoding a large PNG takes a while)
        picture = Image.open(io.BytesIO(first)).convert("RGB")
        if second is not None:
            other = Image.open(io.BytesIO(second)).convert("RGB")
            picture = Image.blend(picture, other, body.extras_upscaler_2_visibility)
        if cropped:
            picture = ImageOps.fit(picture, (body.upscaling_resize_w, body.upscaling_resize_h))
        return encode_image(picture, "png", 100, f"Postprocess upscaler: {body.upscaler_1}")

    return base64.b64encode(await anyio.to_thread.run_sync(finish)).decode()


async def _upscaled(
    runtime: Runtime, request: Request, image: bytes, field: str, name: str, size: dict[str, Any]
) -> bytes:
    """The image upscaled by the upscaler A1111 calls `name` (the `field` an error names), PNG."""
    try:
        upscale = UpscaleRequest(image=image, upscaler=upscaler_id(name), **size)
        return (await runtime.upscale(upscale, request)).data
    except InvalidRequest as exc:  # (named as the client named it)
        raise InvalidRequest(exc.message.replace("upscaler:", f"{field}:", 1), field) from None


def _source_size(image: bytes) -> tuple[int, int]:
    try:
        return open_client_image(image).size
    except Exception:
        raise InvalidRequest(f"image: {UNREAD}", "image") from None
