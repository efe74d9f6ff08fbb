"""The jobs dialect: `POST /v1/jobs` takes the native body plus `preview_every`; a job is
shown as JSON, and its life as Server-Sent Events."""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import Field

from backends.api import errors, native
from backends.sdxl_backend.jobs import Job
from backends.sdxl_backend.protocol import GenerationRequest

FINAL = ("succeeded", "failed", "cancelled")


class JobRequest(GenerationRequest):
    # Send a small preview of the image being formed every K steps (SSE `preview` events and
    # GET /v1/jobs/{id}/preview); decoded from the latents by a linear map, not the VAE.
    preview_every: int | None = Field(None, ge=1)

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(**self.model_dump(exclude={"preview_every"}), image=self.image)


def job_body(job: Job, position: int, base_url: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "queue_position": position,
        "step": job.step,
        "total_steps": job.total_steps,
        "percent": job.percent,
        "created": job.created,
        "elapsed_s": job.elapsed_s,
        "eta_s": job.eta_s,
        "links": {
            "self": f"{base_url}/v1/jobs/{job.id}",
            "events": f"{base_url}/v1/jobs/{job.id}/events",
            "preview": f"{base_url}/v1/jobs/{job.id}/preview",
        },
    }
    if job.cancel_requested_at is not None:
        body["cancel_requested_at"] = job.cancel_requested_at
        if job.finished is not None:
            # How long the device took to be free once the cancellation was asked for.
            body["cancel_to_free_s"] = round(max(0.0, job.finished - job.cancel_requested_at), 3)
    if job.status == "succeeded":
        body["result"] = native.result_body(job.result, int(job.finished)) if job.result else None
    elif job.error is not None:
        body["error"] = errors.backend_error(job.error)[1]["error"]
    return body


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def progress_events(job: Job, position: int, sent_preview_step: int) -> list[str]:
    """The events that tell a watcher where `job` is now."""
    events = [sse("progress", {
        "status": job.status, "queue_position": position, "step": job.step, "total_steps": job.total_steps,
        "percent": job.percent, "elapsed_s": job.elapsed_s, "eta_s": job.eta_s,
    })]
    if job.preview is not None and job.preview_step != sent_preview_step:
        events.append(sse("preview", {"step": job.preview_step, "media_type": "image/png",
                                      "b64_json": base64.b64encode(job.preview).decode()}))
    return events


def final_event(job: Job, base_url: str) -> str:
    event = {"succeeded": "result", "failed": "error", "cancelled": "cancelled"}[job.status]
    return sse(event, job_body(job, 0, base_url))
