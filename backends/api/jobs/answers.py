"""The answer shapes the routes share: a generation's and an upscale's (the native routes', a
job's result) and a job's (the answer of `GET /v1/jobs/{id}`, the events of its stream, and the body of its
webhooks are all this one shape). Plain models over the backend's results: no route, no
runtime, so that webhooks.py and jobs.py read them without reaching up through a dialect."""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, Field

from backends.api.edge import errors
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.jobs.job import JobKind
from backends.sdxl_backend.protocol import GenerationResult, Priority, PromptReading, Timings
from backends.sdxl_backend.upscale_protocol import UpscaleResult, UpscaleTimings


class NativeImage(BaseModel):
    b64_json: str = Field(description="The encoded image, base64.")
    seed: int
    media_type: str
    width: int
    height: int


class GenerationAnswer(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    model: str = Field(description="The model that served (an alias resolved).")
    images: list[NativeImage]
    parameters: dict[str, Any] = Field(description="The request as it ran, every default filled in.")
    timings: Timings
    vram_mode: str = Field(description="The memory mode that served, after any out-of-memory retry.")
    out_of_memory_in: list[str] = Field(description="Memory modes that ran out of memory first (recovered).")
    batch_images: int = Field(
        description="Images in the pipeline call that made these: more than the request's "
        "own when it ran batched with other requests (SDXL_MAX_BATCH)."
    )
    prompt_reading: dict[str, PromptReading] = Field(
        description="What the text encoders read of `prompt` and `negative_prompt`: tokens, and chunks of 75."
    )
    device: str = Field(description="The device that ran it ('cuda:1', 'cpu'; SDXL_DEVICES).")


def result_answer(result: GenerationResult, created: int) -> GenerationAnswer:
    return GenerationAnswer(
        created=created,
        model=result.model,
        images=[
            NativeImage(
                b64_json=base64.b64encode(image.data).decode(),
                seed=image.seed,
                media_type=image.media_type,
                width=image.width,
                height=image.height,
            )
            for image in result.images
        ],
        parameters=result.request.model_dump(),
        timings=result.timings,
        vram_mode=result.vram_mode,
        out_of_memory_in=result.out_of_memory_in,
        batch_images=result.batch_images,
        prompt_reading=result.prompt_reading,
        device=result.device or "",  # (always set by the device worker that ran it)
    )


class UpscaleAnswer(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    upscaler: str
    b64_json: str = Field(description="The encoded image, base64.")
    media_type: str
    width: int
    height: int
    passes: int = Field(description="Runs of the model (a size beyond its scale takes more); 0 for lanczos.")
    tiles: int = Field(description="Pieces the model ran on, over all passes (SDXL_UPSCALE_TILE).")
    timings: UpscaleTimings
    device: str


def upscale_answer(result: UpscaleResult, created: int) -> UpscaleAnswer:
    return UpscaleAnswer(
        created=created,
        b64_json=base64.b64encode(result.data).decode(),
        device=result.device or "",  # (always set by the device worker that ran it)
        **result.model_dump(exclude={"data", "device"}),
    )


class JobLinks(BaseModel):
    self: str
    events: str
    preview: str


class JobAnswer(BaseModel):
    id: str
    kind: JobKind = Field(description="generation, or upscale (/v1/upscale, A1111's extras, the MCP tool).")
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
    result: GenerationAnswer | UpscaleAnswer | None = Field(
        None, description="When succeeded (null once delivered elsewhere); an upscale's is an UpscaleAnswer."
    )
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
    result: GenerationAnswer | UpscaleAnswer | None = None
    if job.status == JobStatus.SUCCEEDED and isinstance(job.result, GenerationResult):
        result = result_answer(job.result, int(job.finished or job.created))
    elif job.status == JobStatus.SUCCEEDED and isinstance(job.result, UpscaleResult):
        result = upscale_answer(job.result, int(job.finished or job.created))
    return JobAnswer(
        id=job.id,
        kind=job.kind,
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
        result=result,
        error=errors.backend_error(job.error)[1]["error"] if job.error and job.status != JobStatus.SUCCEEDED else None,
        webhooks=job.webhooks if job.webhook else None,
    ).model_dump(mode="json")
