"""The AUTOMATIC1111 dialect's routes that generate, or act on the server: txt2img and img2img,
options, png-info, progress and interrupt, memory, unload. The listings are in listings.py."""

from __future__ import annotations

import io
import json
from typing import Annotated, Any

import psutil
from fastapi import APIRouter, Depends, Request
from PIL import Image

from backends.api import errors
from backends.api.a1111.mapping import generation_request, progress, render
from backends.api.a1111.protocol import (
    A1111Answer,
    A1111Img2ImgRequest,
    A1111Options,
    A1111Request,
    PngInfoRequest,
    title_name,
)
from backends.api.runtime import Runtime, runtime_of
from backends.sdxl_backend import infotext
from backends.sdxl_backend.errors import InvalidRequest

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
GENERATION_ERRORS = errors.responses(400, 401, 403, 404, 413, 422, 429, 503, 504, 507)
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
MAX_KEPT_OPTIONS_BYTES = 64 * 1024  # options change nothing here: a client must not grow them without end
A1111_FIELDS = {"hires_fix.upscaler": "hr_upscaler"}  # native fields the server checks, by their A1111 names


@router.post("/txt2img", response_model=A1111Answer, responses=GENERATION_ERRORS)
async def txt2img(body: A1111Request, request: Request, runtime: RuntimeDep) -> dict:
    return await generate(body, False, request, runtime)


@router.post("/img2img", response_model=A1111Answer, responses=GENERATION_ERRORS)
async def img2img(body: A1111Img2ImgRequest, request: Request, runtime: RuntimeDep) -> dict:
    return await generate(body, True, request, runtime)


async def generate(body: A1111Request, img2img: bool, request: Request, runtime: Runtime) -> dict:
    try:
        return render(body, await runtime.run(generation_request(body, img2img), request))
    except InvalidRequest as exc:  # (a field the server checks, named as an A1111 client names it)
        a1111_name = A1111_FIELDS.get(exc.param or "")
        if a1111_name is None or exc.param is None:
            raise
        raise InvalidRequest(exc.message.replace(exc.param, a1111_name, 1), a1111_name) from None


@router.get("/options", responses=errors.responses(401))
async def get_options(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    return {**stored_options(request), "sd_model_checkpoint": runtime.default_model}


@router.post("/options", responses=errors.responses(400, 401, 404))
async def set_options(body: A1111Options, request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """`sd_model_checkpoint` switches the server's default model (as A1111's does, for every
    client); other options are kept and shown by GET, and change nothing else."""
    kept = {**stored_options(request), **(body.model_extra or {})}
    if len(json.dumps(kept)) > MAX_KEPT_OPTIONS_BYTES:
        raise InvalidRequest(
            f"options: the options kept here are limited to {MAX_KEPT_OPTIONS_BYTES} bytes of JSON", "options"
        )
    if body.sd_model_checkpoint is not None:
        runtime.set_default_model(title_name(body.sd_model_checkpoint))
    stored_options(request).update(body.model_extra or {})
    return {}


def stored_options(request: Request) -> dict[str, Any]:
    state = request.app.state
    if not hasattr(state, "a1111_options"):
        state.a1111_options = {}
    return state.a1111_options


@router.post("/png-info", responses=errors.responses(400, 401))
async def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """The generation parameters an image carries (its `parameters` text, as this server and
    A1111 write it), parsed; other text chunks as `items`."""
    try:
        chunks = {k: v for k, v in Image.open(io.BytesIO(body.image)).info.items() if isinstance(v, str)}
    except Exception:
        raise InvalidRequest("image: not an image", "image") from None
    text = chunks.pop("parameters", "")
    return {"info": text, "items": chunks, "parameters": infotext.parse(text)}


@router.get("/progress", responses=errors.responses(401))
async def get_progress(request: Request, runtime: RuntimeDep, skip_current_image: bool = False) -> dict[str, Any]:
    return progress(await runtime.progress_job(request), preview=not skip_current_image)


@router.post("/interrupt", responses=errors.responses(401))
@router.post("/skip", responses=errors.responses(401))
async def interrupt(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Ends the running generation at its next step; its request answers with the image as
    it stood, as A1111's does (with API keys, only a generation of the caller's key). Each
    request here is one batch, so skipping the current batch is the same. (A generation that
    shares its pipeline call with another client's runs on to its end.)"""
    for job in await runtime.running_jobs(request):
        await runtime.interrupt(job)
    return {}


@router.get("/memory", responses=errors.responses(401))
async def memory(runtime: RuntimeDep) -> dict[str, Any]:
    ram = psutil.virtual_memory()
    used_total = runtime.device_memory()
    cuda = (
        {"system": {"free": used_total[1] - used_total[0], "used": used_total[0], "total": used_total[1]}}
        if used_total
        else {"error": "no CUDA device"}
    )
    return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}, "cuda": cuda}


@router.post("/refresh-checkpoints", responses=errors.responses(401))
@router.post("/refresh-vae", responses=errors.responses(401))
@router.post("/refresh-loras", responses=errors.responses(401))
@router.post("/refresh-embeddings", responses=errors.responses(401))
async def refresh_checkpoints() -> None:
    """The served models are fixed at start (the bento's, or SDXL_MODELS), and there are no
    VAEs, LoRAs or embeddings of their own: nothing to rescan."""


@router.post("/unload-checkpoint", responses=errors.responses(401))
async def unload_checkpoint(runtime: RuntimeDep) -> dict[str, Any]:
    """Frees every loaded model, as /v1/system/unload does; the next request loads its model."""
    await runtime.unload()
    return {}
