"""Companion routes: health, the served models and schedulers, device status, unload.

`GET /v1/models` answers three kinds of client at once: moondream-station's (`models`, each
with `type: "generation"` so the gallery does not take it for a vision model, and the VRAM
headers it polls), OpenAI's (`object: "list"`, `data`), and people (descriptions, aliases)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors, headers
from backends.api.operations import metrics
from backends.sdxl_backend.errors import NotPermitted, StoreUnavailable, UnknownModel
from backends.sdxl_backend.models.controlnets import PREPROCESSORS
from backends.sdxl_backend.models.schedulers import MOONDREAM_NAMES, SCHEDULERS

router = APIRouter(tags=["service"])
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


@router.get("/health")
async def health(runtime: RuntimeDep) -> dict[str, Any]:
    return {"status": "ok" if runtime.alive else "dead", "server": "sdxl-bento", "default_model": runtime.default_model}


def model_entries(runtime: Runtime) -> list[dict[str, Any]]:
    """The served models, then the aliases (`alias_of` names the model that serves them)."""

    def entry(model_id: str, served_by: str) -> dict[str, Any]:
        model = runtime.served[served_by]
        return {
            "id": model_id,
            "object": "model",
            "created": runtime.started,
            "owned_by": "sdxl-bento",
            "name": model_id,
            "type": "generation",
            "description": model.description,
            "version": model.version,
            "loaded": runtime.is_loaded(served_by),
            "default": model_id == runtime.default_model,
            # its own sampling facts, which every request on it keeps
            "prediction_type": model.sampling.prediction_type,
            "zero_terminal_snr": model.sampling.zero_snr,
            **({"alias_of": served_by} if served_by != model_id else {}),
        }

    return [entry(m, m) for m in runtime.served] + [entry(alias, target) for alias, target in runtime.aliases.items()]


@router.get("/v1/models", responses=errors.responses(401))
async def list_models(runtime: RuntimeDep) -> JSONResponse:
    entries = model_entries(runtime)
    return JSONResponse(
        {"object": "list", "data": entries, "models": entries},
        headers=headers.vram_headers(runtime.device_memory()),
    )


@router.get("/v1/models/{model_id}", responses=errors.responses(401, 404))
async def get_model(model_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    entry = next((e for e in model_entries(runtime) if e["id"] == model_id), None)
    if entry is None:
        raise UnknownModel(model_id, [e["id"] for e in model_entries(runtime)])
    return entry


def lora_entries(runtime: Runtime) -> list[dict[str, Any]]:
    """The served LoRAs, each with the models it fits and those it is loaded into now."""
    loaded = {entry["id"]: entry["loras"] for entry in runtime.model_status()["loaded"]}
    return [
        {
            "id": lora.id,
            "object": "lora",
            "description": lora.description,
            "sampling": lora.sampling.model_dump() if lora.sampling else None,
            "fits": runtime.models_fitting(lora),
            "loaded_in": [m for m, loras in loaded.items() if lora.id in loras],
        }
        for lora in runtime.loras.values()
    ]


@router.get("/v1/loras", responses=errors.responses(401))
async def list_loras(runtime: RuntimeDep) -> dict[str, Any]:
    """LoRAs a request can name in `loras` (A1111: `<lora:id:weight>` in the prompt), each with
    the served models it fits and those it is loaded into now."""
    return {"object": "list", "data": lora_entries(runtime)}


def side_model_entries(runtime: Runtime, kind: str) -> list[dict[str, Any]]:
    """The served ControlNets or IP-Adapters (`kind`: "controlnets", "ip_adapters"), each with
    the served models it fits and whether it is loaded now."""
    loaded = {entry["id"] for entry in runtime.model_status()[kind]}
    return [
        {
            "id": side_model.id,
            "object": kind.removesuffix("s"),
            "description": side_model.description,
            "fits": runtime.models_fitting(side_model),
            "loaded": side_model.id in loaded,
        }
        for side_model in getattr(runtime, kind).values()
    ]


@router.get("/v1/controlnets", responses=errors.responses(401))
async def list_controlnets(runtime: RuntimeDep) -> dict[str, Any]:
    """ControlNets a request can name in `controlnets` (A1111: a unit's `model`), each with the
    served models it fits, whether it is loaded now, and the preprocessors a unit may ask for."""
    return {"object": "list", "preprocessors": list(PREPROCESSORS), "data": side_model_entries(runtime, "controlnets")}


@router.get("/v1/ip-adapters", responses=errors.responses(401))
async def list_ip_adapters(runtime: RuntimeDep) -> dict[str, Any]:
    """IP-Adapters a request can name in `ip_adapters` (A1111: an `ip-adapter` unit's `model`),
    each with the served models it fits and whether it is loaded now."""
    return {"object": "list", "data": side_model_entries(runtime, "ip_adapters")}


def upscaler_entries(runtime: Runtime) -> list[dict[str, Any]]:
    """The served upscale models, each with its architecture and scale, and whether it is loaded now."""
    loaded = {entry["id"] for entry in runtime.model_status()["upscalers"]}
    sources = runtime.upscaler_sources
    return [
        {
            "id": upscaler.id,
            "object": "upscaler",
            "description": upscaler.description,
            "architecture": sources[upscaler.id].card["architecture"],
            "scale": sources[upscaler.id].scale,
            "loaded": upscaler.id in loaded,
        }
        for upscaler in runtime.upscalers.values()
    ]


@router.get("/v1/upscalers", responses=errors.responses(401))
async def list_upscalers(runtime: RuntimeDep) -> dict[str, Any]:
    """Upscale models for `POST /v1/upscale` and a hires fix's `upscaler` (A1111: `upscaler_1`,
    `hr_upscaler`), each with its architecture and scale; `lanczos`, a plain resize, needs none."""
    return {"object": "list", "data": upscaler_entries(runtime)}


@router.get("/v1/embeddings", responses=errors.responses(401))
async def list_embeddings(runtime: RuntimeDep) -> dict[str, Any]:
    """Textual-inversion embeddings a prompt can name (by id, or `embedding:id`), each with the
    served models it fits and its number of vectors."""
    vectors = runtime.embedding_vectors()
    return {
        "object": "list",
        "data": [
            {
                "id": embedding.id,
                "object": "embedding",
                "description": embedding.description,
                "fits": runtime.models_fitting(embedding),
                "vectors": vectors[embedding.id],
            }
            for embedding in runtime.embeddings.values()
        ],
    }


@router.get("/v1/schedulers", responses=errors.responses(401))
@router.get("/v1/samplers", responses=errors.responses(401))
async def list_schedulers() -> dict[str, Any]:
    """Names, as moondream-station lists them (strings: clients take one and send it back),
    their labels, and the other names /v1/generate takes for them."""
    names = list(SCHEDULERS)
    return {
        "schedulers": names,
        "samplers": names,
        "labels": {name: spec.label for name, spec in SCHEDULERS.items()},
        "aliases": MOONDREAM_NAMES,
    }


@router.get("/v1/system/status", responses=errors.responses(401))
async def system_status(runtime: RuntimeDep) -> dict[str, Any]:
    """Device, memory (bytes), speed settings, loaded models (most recently used first), the jobs
    on this device and the queue (with a shared queue: every replica's)."""
    return {
        **runtime.model_status(),
        "vae": runtime.settings.vae,
        **await runtime.queue_status(),
        "upscales": runtime.upscales,  # upscale calls waiting or running in this server (SDXL_MAX_UPSCALES)
        "device_thread_alive": runtime.alive,
        "device_thread": runtime.device_thread_status(),
    }


def require_admin(request: Request, runtime: Runtime, what: str) -> None:
    """A 403 unless the caller may act for every tenant (SDXL_ADMIN_KEYS)."""
    settings = runtime.settings
    if not headers.holds_admin_key(request.headers, settings.api_keys, settings.admin_keys):
        raise NotPermitted(f"{what} acts for every tenant: it is for the keys in SDXL_ADMIN_KEYS", "authorization")


@router.post("/v1/system/unload", responses=errors.responses(401, 403))
async def unload(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Free every loaded pipeline; the next request loads its model again (admin keys)."""
    require_admin(request, runtime, "unloading the models")
    unloaded = await runtime.unload()
    return {"status": "success", "message": f"unloaded {len(unloaded)} model(s)", "unloaded": unloaded}


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus metrics"},
        **errors.responses(401),
    },
)
async def prometheus_metrics(runtime: RuntimeDep) -> Response:
    """Requests by route template, queued and running jobs, their wait, generations and images
    by model, outcome and device, step seconds, device memory, out-of-memory recoveries, model
    load seconds, Redis's reachability (and the Python process's own figures). With a shared
    queue the job gauges count every replica's jobs (the same on each replica)."""
    with contextlib.suppress(StoreUnavailable):  # Redis away: the queue gauges keep their last values
        await runtime.observe_gauges()
    body, content_type = await anyio.to_thread.run_sync(metrics.exposition)
    return Response(body, media_type=content_type)
