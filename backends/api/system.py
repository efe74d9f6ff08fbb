"""Companion routes: health, the served models and schedulers, device status, unload."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from backends.api import errors, metrics
from backends.api.runtime import Runtime, runtime_of
from backends.sdxl_backend.schedulers import SCHEDULERS

router = APIRouter(tags=["service"])
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


@router.get("/health")
async def health(runtime: RuntimeDep) -> dict[str, Any]:
    return {"status": "ok" if runtime.alive else "dead", "server": "sdxl-bento",
            "default_model": runtime.default_model}


@router.get("/v1/models", responses=errors.responses(401))
async def list_models(runtime: RuntimeDep) -> dict[str, Any]:
    """The served models, then the aliases (`alias_of` names the model that serves them)."""
    manager = runtime.engine.models

    def entry(model_id: str, served_by: str) -> dict[str, Any]:
        model = runtime.served[served_by]
        return {
            "id": model_id,
            "name": model_id,
            "description": model.description,
            "version": model.version,
            "loaded": manager.is_loaded(served_by),
            "default": model_id == runtime.default_model,
            **({"alias_of": served_by} if served_by != model_id else {}),
        }

    return {"models": [entry(m, m) for m in runtime.served]
            + [entry(alias, target) for alias, target in manager.aliases.items()]}


@router.get("/v1/schedulers", responses=errors.responses(401))
@router.get("/v1/samplers", responses=errors.responses(401))
async def list_schedulers() -> dict[str, Any]:
    schedulers = [{"name": name, "label": spec.label} for name, spec in SCHEDULERS.items()]
    return {"schedulers": schedulers, "samplers": schedulers}


@router.get("/v1/system/status", responses=errors.responses(401))
async def system_status(runtime: RuntimeDep) -> dict[str, Any]:
    """Device, memory (bytes), loaded models (most recently used first) and the queue."""
    return {**runtime.engine.models.status(), "queue_length": runtime.jobs.queue_length,
            "device_thread_alive": runtime.alive}


@router.post("/v1/system/unload", responses=errors.responses(401))
async def unload(runtime: RuntimeDep) -> dict[str, Any]:
    """Free every loaded pipeline; the next request loads its model again."""
    unloaded = await anyio.to_thread.run_sync(runtime.engine.models.unload)
    return {"status": "ok", "unloaded": unloaded}


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus metrics"},
    **errors.responses(401)})
async def prometheus_metrics() -> Response:
    """Requests by route template, queued and running jobs, generations by model and outcome,
    out-of-memory recoveries, model load seconds (and the Python process's own figures)."""
    body, content_type = await anyio.to_thread.run_sync(metrics.exposition)
    return Response(body, media_type=content_type)
