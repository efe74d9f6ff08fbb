"""How a job is shown: the answer of `GET /v1/jobs/{id}`, the events of its stream, and the
body of its webhooks (webhooks.py) are all this one shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from backends.api import errors, native
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.protocol import Priority


class JobLinks(BaseModel):
    self: str
    events: str
    preview: str


class JobAnswer(BaseModel):
    id: str
    status: JobStatus
    queue_position: int = Field(
        description="1 for the next job to run; 0 when not waiting. API keys take turns, so it can move."
    )
    priority: Priority
    device: str | None = Field(None, description="The device that runs (or ran) it, once taken ('cuda:1').")
    step: int
    total_steps: int
    percent: float
    created: float
    elapsed_s: float | None
    eta_s: float | None
    links: JobLinks
    cancel_requested_at: float | None = None
    cancel_to_free_s: float | None = Field(None, description="From the cancel request to the device being free.")
    result: native.GenerationAnswer | None = Field(None, description="When succeeded (null once delivered elsewhere).")
    error: errors.ErrorDetail | None = Field(None, description="When failed or cancelled.")
    webhooks: dict[str, dict[str, Any]] | None = Field(
        None,
        description="With a webhook: each event's delivery once tried ({status: delivered|failed, attempts, error}).",
    )


def job_body(job: Job, position: int, base_url: str) -> dict[str, Any]:
    # How long the device took to be free once the cancellation was asked for.
    cancel_to_free_s = None
    if job.cancel_requested_at is not None and job.finished is not None:
        cancel_to_free_s = round(max(0.0, job.finished - job.cancel_requested_at), 3)
    return JobAnswer(
        id=job.id,
        status=job.status,
        queue_position=position,
        priority=job.priority,
        device=job.device,
        step=job.step,
        total_steps=job.total_steps,
        percent=job.percent,
        created=job.created,
        elapsed_s=job.elapsed_s,
        eta_s=job.eta_s,
        links=JobLinks(
            self=f"{base_url}/v1/jobs/{job.id}",
            events=f"{base_url}/v1/jobs/{job.id}/events",
            preview=f"{base_url}/v1/jobs/{job.id}/preview",
        ),
        cancel_requested_at=job.cancel_requested_at,
        cancel_to_free_s=cancel_to_free_s,
        result=native.result_answer(job.result, int(job.finished or job.created))
        if job.result and job.status == JobStatus.SUCCEEDED
        else None,
        error=errors.backend_error(job.error)[1]["error"] if job.error and job.status != JobStatus.SUCCEEDED else None,
        webhooks=job.webhooks if job.webhook else None,
    ).model_dump(mode="json")
