"""The AUTOMATIC1111 dialect's routes that generate, or act on the server: txt2img and img2img,
options, png-info, progress and interrupt, memory, unload. The listings are in listings.py."""

from __future__ import annotations

from typing import Annotated, Any

import psutil
from fastapi import APIRouter, Depends, Request

from backends.api.a1111.mapping import generation_request, progress, render
from backends.api.a1111.options import DEFAULT_OPTIONS, picture_fields
from backends.api.a1111.protocol import A1111Answer, A1111Img2ImgRequest, A1111Options, A1111Request, PngInfoRequest
from backends.api.composition.caller_options import MODEL_OPTION
from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors
from backends.api.operations.system import require_admin
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation import infotext
from backends.sdxl_backend.generation.images import UNREAD, open_client_image

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
GENERATION_ERRORS = errors.responses(400, 401, 403, 404, 413, 422, 429, 503, 504, 507)
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
A1111_FIELDS = {"hires_fix.upscaler": "hr_upscaler"}  # native fields the server checks, by their A1111 names


@router.post("/txt2img", response_model=A1111Answer, responses=GENERATION_ERRORS)
async def txt2img(body: A1111Request, request: Request, runtime: RuntimeDep) -> dict:
    return await generate(body, False, request, runtime)


@router.post("/img2img", response_model=A1111Answer, responses=GENERATION_ERRORS)
async def img2img(body: A1111Img2ImgRequest, request: Request, runtime: RuntimeDep) -> dict:
    return await generate(body, True, request, runtime)


async def generate(body: A1111Request, img2img: bool, request: Request, runtime: Runtime) -> dict:
    kept = await runtime.caller_options_of(request)
    try:
        generation = generation_request(body, img2img, kept, runtime.settings.vae)
        return render(body, await runtime.run(generation, request))
    except InvalidRequest as exc:  # (a field the server checks, named as an A1111 client names it)
        a1111_name = A1111_FIELDS.get(exc.param or "")
        if a1111_name is None or exc.param is None:
            raise
        raise InvalidRequest(exc.message.replace(exc.param, a1111_name, 1), a1111_name) from None


@router.get("/options", responses=errors.responses(401))
async def get_options(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """The options the caller's API key set, over A1111's defaults of those this server acts on."""
    kept = await runtime.caller_options_of(request)
    return {**DEFAULT_OPTIONS, **kept, MODEL_OPTION: kept.get(MODEL_OPTION) or runtime.default_model}


@router.post("/options", responses=errors.responses(400, 401, 404))
async def set_options(body: A1111Options, request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Takes the whole dict GET answers, or a part of it, for the caller's API key alone:
    `sd_model_checkpoint` becomes the default model of the key's requests (in every dialect),
    the clip skip and VAE options apply to its A1111 generations, and the rest is kept and shown
    by GET. An option that would change the picture in a way this server cannot is a 400."""
    changes = body.model_dump(exclude_none=True) | (body.model_extra or {})
    fields = picture_fields(changes, runtime.settings.vae, "")
    if "model" in fields:
        runtime.model_source(fields["model"])  # (an unknown one: 404 naming it)
        changes[MODEL_OPTION] = fields["model"]
    await runtime.set_caller_options(request, changes)
    return {}


@router.post("/png-info", responses=errors.responses(400, 401))
async def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """The generation parameters an image carries (its `parameters` text, as this server and
    A1111 write it), parsed; other text chunks as `items`."""
    try:
        chunks = {k: v for k, v in open_client_image(body.image).info.items() if isinstance(v, str)}
    except Exception:
        raise InvalidRequest(f"image: {UNREAD}", "image") from None
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


@router.post("/unload-checkpoint", responses=errors.responses(401, 403))
async def unload_checkpoint(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Frees every loaded model, as /v1/system/unload does (admin keys); the next request loads its model."""
    require_admin(request, runtime, "unloading the models")
    await runtime.unload()
    return {}
