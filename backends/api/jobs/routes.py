"""The jobs dialect: `POST /v1/jobs` takes the native body plus `preview_every` and answers 202
at once (after validation: a bad request is a 400, never a failed job); a job is shown as
JSON, and its life as Server-Sent Events."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors
from backends.api.jobs.answers import JobAnswer, job_body
from backends.api.jobs.webhooks import WebhookSpec
from backends.sdxl_backend.errors import BackendError, InvalidRequest, QueueFull
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.protocol import GenerationRequest

RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream


class TooManyStreams(QueueFull):
    """As many event streams are open as the server allows (SDXL_MAX_EVENT_STREAMS): 429."""


class JobRequest(GenerationRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"prompt": "a lighthouse at dusk", "steps": 12, "width": 512, "height": 512, "preview_every": 4}
        }
    )

    # Send a small preview of the image being formed every K steps (SSE `preview` events and
    # GET /v1/jobs/{id}/preview); decoded from the latents by a linear map, not the VAE.
    preview_every: int | None = Field(None, ge=1, description="A latent preview every K steps.")
    webhook: WebhookSpec | None = Field(None, description="Call a URL when the job starts or ends (signed).")

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(**{name: getattr(self, name) for name in GenerationRequest.model_fields})


class JobList(BaseModel):
    jobs: list[JobAnswer]
    next_before: float | None = Field(None, description="Pass as `before` for the next page; null on the last.")


async def answer(runtime: Runtime, job: Job, base_url: str) -> dict[str, Any]:
    return job_body(job, await runtime.position(job), base_url)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def progress_events(job: Job, position: int, sent_preview_step: int) -> list[str]:
    """The events that tell a watcher where `job` is now."""
    events = [
        sse(
            "progress",
            {
                "status": job.status.value,
                "queue_position": position,
                "step": job.step,
                "total_steps": job.total_steps,
                "percent": job.percent,
                "elapsed_s": job.elapsed_s,
                "eta_s": job.eta_s,
            },
        )
    ]
    if job.preview is not None and job.preview_step != sent_preview_step:
        events.append(
            sse(
                "preview",
                {
                    "step": job.preview_step,
                    "media_type": "image/png",
                    "b64_json": base64.b64encode(job.preview).decode(),
                },
            )
        )
    return events


def final_event(job: Job, base_url: str) -> str:
    event = {JobStatus.SUCCEEDED: "result", JobStatus.FAILED: "error", JobStatus.CANCELLED: "cancelled"}[job.status]
    return sse(event, job_body(job, 0, base_url))


router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
NOT_FOUND = errors.responses(401, 404, 410)


@router.post(
    "", status_code=202, response_model=JobAnswer, responses=errors.responses(400, 401, 403, 404, 413, 422, 429, 503)
)
async def submit(body: JobRequest, request: Request, runtime: RuntimeDep) -> JSONResponse:
    """The native body (an `image` makes it img2img), checked, queued and answered at once."""
    job = await runtime.submit(body.generation_request(), request, body.preview_every, body.webhook)
    shown = await answer(runtime, job, runtime.base_url(request))
    return JSONResponse(shown, status_code=202, headers={"Location": shown["links"]["self"]})


@router.get("", response_model=JobList, responses=errors.responses(400, 401))
async def list_jobs(
    request: Request,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
    before: Annotated[
        float | None, Query(description="Only jobs created before this time (the previous page's next_before).")
    ] = None,
) -> dict:
    """Recent jobs, newest first, a page at a time."""
    base = runtime.base_url(request)
    page = await runtime.recent_jobs(request, limit + 1, before)
    more = len(page) > limit
    page = page[:limit]
    return {
        "jobs": [await answer(runtime, job, base) for job in page],
        "next_before": page[-1].created if more else None,
    }


@router.get("/{job_id}", response_model=JobAnswer, responses=NOT_FOUND)
async def get_job(job_id: str, request: Request, runtime: RuntimeDep) -> dict:
    job = await runtime.job(job_id, request)
    return await answer(runtime, job, runtime.base_url(request))


@router.delete("/{job_id}", response_model=JobAnswer, responses=NOT_FOUND)
@router.post("/{job_id}/cancel", response_model=JobAnswer, responses=NOT_FOUND)
async def cancel_job(job_id: str, request: Request, runtime: RuntimeDep) -> dict:
    """A queued job never starts; a running one stops at its next step. Cancelling a
    finished job changes nothing."""
    job = await runtime.job(job_id, request)
    return await answer(runtime, await runtime.cancel(job), runtime.base_url(request))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`progress` (and `preview`) events, then `result`, `error` or `cancelled`",
        },
        **errors.responses(401, 404, 410, 429),
    },
)
async def job_events(job_id: str, request: Request, runtime: RuntimeDep) -> StreamingResponse:
    """Server-Sent Events: `progress` (and `preview`) while it runs, then `result`,
    `error` or `cancelled`, then the stream ends."""
    job, base = await runtime.job(job_id, request), runtime.base_url(request)
    owner = runtime.owner(request) or ""  # (each API key has its own slots: one never takes another's)
    if runtime.event_streams[owner] >= runtime.settings.max_event_streams:
        raise TooManyStreams(
            f"{runtime.event_streams[owner]} event streams of this key are open (SDXL_MAX_EVENT_STREAMS, per "
            f"API key); poll GET /v1/jobs/{{id}} or retry later",
            1,
        )
    runtime.event_streams[owner] += 1

    async def stream() -> AsyncIterator[str]:
        try:
            async for event in events():
                yield event
        finally:
            runtime.event_streams[owner] -= 1

    async def events() -> AsyncIterator[str]:
        seen, preview_step, current = -1, 0, job
        while True:
            version, final = current.version, current.status.final
            if version != seen:
                seen = version
                for event in progress_events(current, await runtime.position(current), preview_step):
                    yield event
                preview_step = current.preview_step
            if final:
                yield final_event(current, base)
                return
            try:
                current = await runtime.changed(current, seen, KEEPALIVE_S)
            except BackendError:  # Redis went away (or the job expired): the stream ends, the client polls
                return
            if current.version == seen and not current.status.final:
                yield ": waiting\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get(
    "/{job_id}/preview",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The latest latent preview",
        },
        **errors.responses(400, 401, 404, 410),
    },
)
async def job_preview(job_id: str, request: Request, runtime: RuntimeDep) -> Response:
    job = await runtime.job(job_id, request)
    if job.preview is None:
        raise InvalidRequest("preview: this job has no preview yet (submit with preview_every)", "preview_every")
    return Response(job.preview, media_type="image/png", headers={"X-Preview-Step": str(job.preview_step)})
