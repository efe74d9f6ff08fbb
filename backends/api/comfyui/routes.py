"""The ComfyUI dialect's HTTP routes, at the root and under `/api` as ComfyUI serves them:
prompts in (checked, planned, queued as jobs), the queue and history out, images up and down,
and the listings clients read (`/object_info`, `/system_stats`, `/models`, `/embeddings`)."""

from __future__ import annotations

import io
import json
import platform
import re
import sys
from importlib.metadata import version
from typing import Annotated, Any

import anyio
import psutil
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from backends.api.comfyui.answers import catalog, history_entry, queue_item
from backends.api.comfyui.conditioning import Served
from backends.api.comfyui.graph import Workflow, WorkflowRefused, node_error
from backends.api.comfyui.plan import Plan, Planner
from backends.api.comfyui.records import PromptRecord
from backends.api.comfyui.socket import SOCKETS
from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors
from backends.sdxl_backend.errors import InvalidRequest, JobExpired, UnknownJob, UnknownModel
from backends.sdxl_backend.generation.images import UNREAD, open_client_image
from backends.sdxl_backend.jobs import Job
from backends.sdxl_backend.models.loras import LORA_FILE, holds_text_encoder_weights
from backends.sdxl_backend.protocol import GenerationResult

RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
router = APIRouter(tags=["ComfyUI"])
OUTPUT_NAME = re.compile(r"^([0-9a-f]{32})_(\d+)\.(png|jpg|webp)$")
LISTED = 100  # the prompts `/queue` and `/history` look through: the caller's newest
# Preview frames on the socket when a prompt's extra_data asks for them (ComfyUI's default
# method is none, and comfy-api-simplified takes any binary frame for a result image).
PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


def served_lists(runtime: Runtime) -> dict[str, list[str]]:
    """The COMBO lists of the nodes: each served thing by its id and as a file name."""

    def with_files(ids: list[str]) -> list[str]:
        return [*ids, *(f"{i}.safetensors" for i in ids)]

    return {
        "checkpoints": with_files(sorted([*runtime.served, *runtime.aliases])),
        "loras": with_files(sorted(runtime.loras)),
        "upscale_models": with_files(sorted(runtime.upscalers)),
        "controlnet": with_files(sorted(runtime.controlnets)),
        "embeddings": sorted(runtime.embeddings),
        "vae": with_files([runtime.settings.vae]) if runtime.settings.vae else [],
        "diffusion_models": [],
    }


async def json_body(request: Request) -> dict[str, Any]:
    """The body as JSON whatever its Content-Type (SillyTavern posts it as text/plain)."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise WorkflowRefused("invalid_prompt", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise WorkflowRefused("invalid_prompt", "the body must be a JSON object with a `prompt`")
    return body


def make_plan(runtime: Runtime, workflow_json: Any) -> Plan:
    lists = served_lists(runtime)
    workflow = Workflow(workflow_json, lambda name: None if name == "uploads" else lists.get(name, []))

    def upload(name: str) -> bytes | None:
        kept = runtime.kept_images.get(name)
        return kept.data if kept is not None else None

    served = Served(
        upload=upload,
        upscaler_scale=lambda upscaler_id: runtime.upscaler_sources[upscaler_id].scale,
        lora_changes_clip=lambda lora_id: holds_text_encoder_weights(runtime.loras[lora_id].path / LORA_FILE),
        predicts_v=lambda model_id: runtime.served[model_id].sampling.prediction_type == "v_prediction",
    )
    return Planner(workflow, served).plan()


@router.post("/prompt", responses=errors.responses(400, 401, 404, 413, 429, 503))
async def queue_prompt(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Checks the workflow as ComfyUI does (a 400 with `node_errors` naming the node and input),
    recognises what it draws and queues it as one job; the prompt's id is the job's."""
    body = await json_body(request)
    if body.get("prompt_id"):
        raise WorkflowRefused("invalid_prompt", "prompt_id: this server names each prompt (the answer gives its id)")
    extra_data = body.get("extra_data")
    plan = await anyio.to_thread.run_sync(make_plan, runtime, body.get("prompt"))
    previews = isinstance(extra_data, dict) and extra_data.get("preview_method") in PREVIEW_METHODS
    try:
        job = await runtime.submit(plan.request, request, preview_every=1 if previews else None)
    except InvalidRequest as exc:  # (what the engine checks: named as the node and input that set it)
        node_id, input_name = plan.fields.get(exc.param or "", (plan.sampler, None))
        raise node_error(
            node_id, plan_class(plan, node_id, body), input_name, exc.message, "value_not_valid_here"
        ) from None
    except UnknownModel as exc:
        node_id, input_name = plan.fields.get("model", (plan.sampler, None))
        raise node_error(
            node_id, plan_class(plan, node_id, body), input_name, exc.message, "value_not_in_list"
        ) from None
    client_id = body.get("client_id") if isinstance(body.get("client_id"), str) else None
    record = PromptRecord(
        number=await anyio.to_thread.run_sync(runtime.comfyui_prompts.next_number),
        client_id=client_id,
        outputs=plan.outputs,
        sampler=plan.sampler,
        executed=plan.executed,
        images=plan.request.n,
        extension={"jpeg": "jpg"}.get(plan.request.output_format, plan.request.output_format),
        workflow=body["prompt"],
        extra_data=extra_data if isinstance(extra_data, dict) else {},
        previews=previews,
    )
    await anyio.to_thread.run_sync(runtime.comfyui_prompts.put, job.id, record)
    if client_id is not None:
        SOCKETS.wake(client_id)
    return {"prompt_id": job.id, "number": record.number, "node_errors": {}}


def plan_class(plan: Plan, node_id: str, body: dict[str, Any]) -> str:
    return str(body["prompt"].get(node_id, {}).get("class_type", "KSampler"))


async def callers_prompts(request: Request, runtime: Runtime) -> list[tuple[Job, PromptRecord]]:
    """The caller's newest ComfyUI prompts (their jobs, without images, and records), oldest first."""
    owner = runtime.owner(request)

    def read() -> list[tuple[Job, PromptRecord]]:
        jobs = runtime.recent_of(owner, LISTED)
        pairs = [(job, runtime.comfyui_prompts.get(job.id)) for job in reversed(jobs)]
        return [(job, record) for job, record in pairs if record is not None]

    return await anyio.to_thread.run_sync(read)


@router.get("/prompt", responses=errors.responses(401))
async def prompt_status(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    pending = [job for job, _ in await callers_prompts(request, runtime) if not job.status.final]
    return {"exec_info": {"queue_remaining": len(pending)}}


@router.get("/queue", responses=errors.responses(401))
async def get_queue(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    prompts = await callers_prompts(request, runtime)
    return {
        "queue_running": [queue_item(job, record) for job, record in prompts if job.status.value == "running"],
        "queue_pending": [queue_item(job, record) for job, record in prompts if job.status.value == "queued"],
    }


@router.post("/queue", responses=errors.responses(400, 401))
async def manage_queue(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """`{"delete": [prompt ids]}` cancels those prompts; `{"clear": true}` every pending one of the caller."""
    body = await json_body(request)
    prompts = await callers_prompts(request, runtime)
    deleted = set(body.get("delete") or []) if isinstance(body.get("delete"), list) else set()
    for job, _ in prompts:
        if not job.status.final and (job.id in deleted or (body.get("clear") and job.status.value == "queued")):
            await runtime.cancel(job)
    return {}  # (ComfyUI answers an empty 200; its clients read the status alone)


@router.post("/interrupt", responses=errors.responses(401))
async def interrupt(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Stops the caller's running prompt (or the one `prompt_id` names) at its next step, without
    an image, as ComfyUI's interrupt does."""
    raw = await request.body()
    try:
        named = json.loads(raw).get("prompt_id") if raw else None
    except (ValueError, AttributeError):
        named = None
    for job in await runtime.running_jobs(request):
        record = await anyio.to_thread.run_sync(runtime.comfyui_prompts.get, job.id)
        if named in (None, job.id) and record is not None:
            await runtime.cancel(job)
    return {}  # (ComfyUI answers an empty 200; its clients read the status alone)


@router.get("/history", responses=errors.responses(401))
async def get_history(
    request: Request, runtime: RuntimeDep, max_items: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    finished = [(job, record) for job, record in await callers_prompts(request, runtime) if job.status.final]
    if max_items is not None:
        finished = finished[-max_items:]
    return {job.id: history_entry(job, record) for job, record in finished}


@router.get("/history/{prompt_id}", responses=errors.responses(401))
async def get_prompt_history(prompt_id: str, request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """`{}` until the prompt has ended (or when the caller may not see it), then its entry."""
    record = await anyio.to_thread.run_sync(runtime.comfyui_prompts.get, prompt_id)
    if record is None:
        return {}
    try:
        job = await runtime.job(prompt_id, request)
    except (UnknownJob, JobExpired):
        return {}
    return {job.id: history_entry(job, record)} if job.status.final else {}


@router.post("/history", responses=errors.responses(400, 401))
async def manage_history(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """`{"delete": [prompt ids]}` or `{"clear": true}`: those prompts leave the history (their
    jobs stay in /v1/jobs until they expire)."""
    body = await json_body(request)
    deleted = set(body.get("delete") or []) if isinstance(body.get("delete"), list) else set()
    for job, _ in await callers_prompts(request, runtime):
        if job.status.final and (body.get("clear") or job.id in deleted):
            await anyio.to_thread.run_sync(runtime.comfyui_prompts.delete, job.id)
    return {}  # (ComfyUI answers an empty 200; its clients read the status alone)


@router.get("/view", response_class=Response, responses=errors.responses(400, 401, 404))
async def view(
    request: Request, runtime: RuntimeDep, filename: str, type: str = "output", subfolder: str = ""
) -> Response:
    """An output image (`<prompt id>_<index>.<ext>`, the caller's prompts only), or an upload."""
    if type == "input":
        kept = await anyio.to_thread.run_sync(runtime.kept_images.get, filename)
        if kept is None:
            raise UnknownJob(f"filename: no uploaded image '{filename}'", "filename")
        return Response(kept.data, media_type=kept.media_type)
    matched = OUTPUT_NAME.match(filename)
    if matched is None or type not in ("output", "temp"):
        raise UnknownJob(f"filename: no image '{filename}' of type '{type}' here", "filename")
    job = await runtime.job(matched[1], request)
    images = job.result.images if isinstance(job.result, GenerationResult) else []
    if int(matched[2]) >= len(images):
        raise UnknownJob(f"filename: no image '{filename}' here", "filename")
    image = images[int(matched[2])]
    return Response(image.data, media_type=image.media_type)


async def kept_upload(runtime: Runtime, data: bytes) -> dict[str, str]:
    """An uploaded image, checked (one of the formats read here) and kept like an image link:
    its name is unguessable, and it expires (SDXL_IMAGE_URL_TTL_SECONDS)."""
    try:
        picture = open_client_image(data)
        picture.verify()
    except Exception:
        raise InvalidRequest(f"image: {UNREAD}", "image") from None
    media_type = IMAGE_TYPES[picture.format or "PNG"]
    name = await anyio.to_thread.run_sync(runtime.kept_images.put, data, media_type, media_type.split("/")[1])
    return {"name": name, "subfolder": "", "type": "input"}


@router.post("/upload/image", responses=errors.responses(400, 401, 413))
async def upload_image(request: Request, runtime: RuntimeDep) -> dict[str, str]:
    """Multipart `image` (ComfyUI's `overwrite`, `subfolder` and `type` are accepted; the name
    is the server's, never a path the client gives)."""
    form = await request.form()
    image = form.get("image")
    if image is None or isinstance(image, str):
        raise InvalidRequest("image: a file in the multipart field 'image' is needed", "image")
    return await kept_upload(runtime, await image.read())


@router.post("/upload/mask", responses=errors.responses(400, 401, 404, 413))
async def upload_mask(request: Request, runtime: RuntimeDep) -> dict[str, str]:
    """ComfyUI's mask editor: `image` (its alpha the mask) onto the uploaded image that
    `original_ref` names, kept as a new upload (the original's colours, the mask's alpha)."""
    form = await request.form()
    image, reference = form.get("image"), form.get("original_ref")
    if image is None or isinstance(image, str):
        raise InvalidRequest("image: a file in the multipart field 'image' is needed", "image")
    try:
        original_name = json.loads(str(reference))["filename"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest(
            'original_ref: JSON naming the uploaded image, {"filename": ...}', "original_ref"
        ) from None
    kept = await anyio.to_thread.run_sync(runtime.kept_images.get, str(original_name))
    if kept is None:
        raise UnknownJob(f"original_ref: no uploaded image '{original_name}'", "original_ref")

    def compose() -> bytes:
        original = Image.open(io.BytesIO(kept.data), formats=list(IMAGE_TYPES)).convert("RGBA")
        mask = Image.open(io.BytesIO(data), formats=list(IMAGE_TYPES)).convert("RGBA").resize(original.size)
        original.putalpha(mask.getchannel("A"))
        buffer = io.BytesIO()
        original.save(buffer, format="PNG")
        return buffer.getvalue()

    data = await image.read()
    try:
        composed = await anyio.to_thread.run_sync(compose)
    except Exception:
        raise InvalidRequest(f"image: {UNREAD}", "image") from None
    return await kept_upload(runtime, composed)


@router.get("/system_stats", responses=errors.responses(401))
async def system_stats(runtime: RuntimeDep) -> dict[str, Any]:
    ram = psutil.virtual_memory()
    used, total = runtime.device_memory() or (0, 0)
    return {
        "system": {
            "os": "nt" if platform.system() == "Windows" else "posix",
            "ram_total": ram.total,
            "ram_free": ram.available,
            "comfyui_version": "compatible (sdxl-bento)",
            "python_version": sys.version,
            "pytorch_version": version("torch"),
            "embedded_python": False,
            "argv": [],
        },
        "devices": [
            {
                "name": runtime.device_type,
                "type": runtime.device_type,
                "index": 0,
                "vram_total": total,
                "vram_free": total - used,
                "torch_vram_total": total,
                "torch_vram_free": total - used,
            }
        ],
    }


@router.get("/object_info", responses=errors.responses(401))
async def object_info(runtime: RuntimeDep) -> dict[str, Any]:
    return catalog(served_lists(runtime))


@router.get("/object_info/{node_class}", responses=errors.responses(401, 404))
async def object_info_of(node_class: str, runtime: RuntimeDep) -> dict[str, Any]:
    """The node's description, or `{}` for a class this server does not run (as ComfyUI answers)."""
    return catalog(served_lists(runtime), node_class)


@router.get("/embeddings", responses=errors.responses(401))
async def embeddings(runtime: RuntimeDep) -> list[str]:
    return served_lists(runtime)["embeddings"]


@router.get("/models", responses=errors.responses(401))
async def model_folders(runtime: RuntimeDep) -> list[str]:
    return list(served_lists(runtime))


@router.get("/models/{folder}", responses=errors.responses(401, 404))
async def models_in(folder: str, runtime: RuntimeDep) -> JSONResponse:
    lists = served_lists(runtime)
    if folder not in lists:
        return JSONResponse(errors.status_error(404, f"folder: no model folder '{folder}'"), status_code=404)
    return JSONResponse(lists[folder])
