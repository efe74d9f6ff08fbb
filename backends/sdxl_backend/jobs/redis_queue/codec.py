"""How jobs sit in Redis: a job's hash fields to and from `Job`s and what they run (a
`PreparedRequest`, or a `PreparedUpscale` for a job of kind "upscale"). The input images travel
as PNG (lossless: the replica that runs a job sees the same pixels), a result's images as their
encoded bytes, one field each."""

from __future__ import annotations

import io
import json
import time
from typing import TYPE_CHECKING

from PIL import Image

from backends.sdxl_backend import errors
from backends.sdxl_backend.errors import BackendError
from backends.sdxl_backend.jobs.job import WEBHOOK_EVENTS, Job, JobStatus
from backends.sdxl_backend.protocol import GeneratedImage, GenerationResult, ResolvedRequest
from backends.sdxl_backend.upscale_protocol import UpscaleRequest, UpscaleResult

if TYPE_CHECKING:
    from backends.sdxl_backend.generation.engine import Engine
    from backends.sdxl_backend.generation.prepared import PreparedRequest
    from backends.sdxl_backend.generation.upscaling import PreparedUpscale
    from backends.sdxl_backend.jobs.job import JobWork

# What a snapshot reads; the input images and the result's images stay behind.
SNAPSHOT_FIELDS = [
    "kind",
    "status",
    "owner",
    "created",
    "started",
    "finished",
    "step",
    "total_steps",
    "version",
    "preview_every",
    "preview",
    "preview_step",
    "first_step_at",
    "cancel_requested_at",
    "stop_requested_at",
    "device",
    "webhook",
    *(f"webhook:{event}" for event in WEBHOOK_EVENTS),
    "error_type",
    "error_message",
    "error_param",
    "request",
    "result",
    "images",
]
ERROR_TYPES = {
    name: value for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, BackendError)
}
# A job hash's fields as written (keyed as redis-py's hset types them).
Fields = dict[bytes | bytearray | memoryview | str | int | float, bytes | str | float | int]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decoded(value: object) -> str:
    """A reply as text: bytes from this client (it does not decode), whatever redis-py's type says."""
    return value.decode() if isinstance(value, bytes) else str(value)


def number(value: bytes | str | None) -> float | None:
    return float(value) if value else None


def request_from_json(data: str | bytes) -> ResolvedRequest:
    """A request dumped as JSON, back: the units' images are left out of dumps (the control
    maps and the image prompts' pictures travel beside it), so each unit gets an empty one."""
    fields = json.loads(data)
    for unit in [*fields.get("controlnets", []), *fields.get("ip_adapters", [])]:
        unit["image"] = ""
    return ResolvedRequest.model_validate(fields)


def upscale_request_from_json(data: str | bytes) -> UpscaleRequest:
    """An upscale request dumped as JSON, back (its image travels beside it)."""
    return UpscaleRequest.model_validate({**json.loads(data), "image": ""})


def work(prepared: JobWork) -> Fields:
    """What a job runs: the request as it will run, and its images."""
    from backends.sdxl_backend.generation.upscaling import PreparedUpscale

    if isinstance(prepared, PreparedUpscale):
        return {"request": prepared.request.model_dump_json(), "init_image": png(prepared.image)}
    fields: Fields = {"request": prepared.request.model_dump_json()}
    if prepared.init_image is not None:
        fields["init_image"] = png(prepared.init_image)
    if prepared.mask is not None:
        fields["mask"] = png(prepared.mask)
    for index, control in enumerate(prepared.controls):
        fields[f"control:{index}"] = png(control)
    for index, picture in enumerate(prepared.image_prompts):
        fields[f"image_prompt:{index}"] = png(picture)
    return fields


def submitted(job: Job, prepared: JobWork, batch_key: object) -> Fields:
    """A new job's fields: what it runs, its state."""
    return {
        **work(prepared),
        "kind": job.kind,
        "status": "queued",
        "owner": job.owner or "",
        "priority": job.priority,
        "webhook": json.dumps(job.webhook) if job.webhook else "",
        "trace": json.dumps(job.trace) if job.trace else "",
        "created": job.created,
        "step": 0,
        "total_steps": job.total_steps,
        "version": 0,
        "preview_every": job.preview_every or "",
        "n": prepared.image_count,
        "batch_key": json.dumps(batch_key) if batch_key is not None else "",
        "attempts": 0,
    }


def prepared_from(fields: dict[bytes, bytes], engine: Engine) -> PreparedRequest | PreparedUpscale:
    """What the job runs, prepared again on the replica that runs it (which must serve its models)."""
    from backends.sdxl_backend.generation.prepared import PreparedRequest

    def image(name: str) -> Image.Image | None:
        data = fields.get(name.encode())
        return Image.open(io.BytesIO(data)).copy() if data else None

    if fields.get(b"kind") == b"upscale":
        picture = image("init_image")
        if picture is None:
            raise ValueError("an upscale job without its image")
        return engine.upscaling.again(upscale_request_from_json(fields[b"request"]), picture)

    def pictures(prefix: str, count: int) -> list[Image.Image]:  # (each unit's is there: `submitted`)
        return [picture for index in range(count) if (picture := image(f"{prefix}:{index}")) is not None]

    request = request_from_json(fields[b"request"])
    refiner = engine.models.source(request.refiner.model) if request.refiner else None
    source = engine.models.source(request.model or engine.default_model)  # (resolved: it is set)
    return PreparedRequest(
        request,
        source,
        engine.read_prompts(request, source),
        init_image=image("init_image"),
        mask=image("mask"),
        refiner=refiner,
        controls=pictures("control", len(request.controlnets)),
        image_prompts=pictures("image_prompt", len(request.ip_adapters)),
        refiner_prompts=engine.read_prompts(request, refiner) if refiner else None,
    )


def taken(job_id: str, fields: dict[bytes, bytes], engine: Engine) -> Job:
    """A job a replica took, to run: its request prepared again. One that cannot run here (a
    `BackendError`, a replica of another version, a record broken by hand or by a bug) comes back
    failed, to be finished as such: a taken job never stays taken."""
    owner = fields.get(b"owner", b"").decode(errors="replace") or None
    try:
        created = float(fields[b"created"])
    except (KeyError, ValueError):
        created = time.time()
    try:
        return Job(
            job_id,
            prepared_from(fields, engine),
            int(fields.get(b"preview_every") or 0) or None,
            owner,
            status=JobStatus.RUNNING,
            created=created,
            webhook=json.loads(fields[b"webhook"]) if fields.get(b"webhook") else None,
            trace=json.loads(fields[b"trace"]) if fields.get(b"trace") else {},
        )
    except Exception as exc:
        job = Job(job_id, None, owner=owner, status=JobStatus.RUNNING, created=created)
        job.error = (
            exc
            if isinstance(exc, BackendError)
            else BackendError(
                f"this replica cannot run the job ({type(exc).__name__}): are the replicas of one version?"
            )
        )
        return job


def progress(job: Job) -> Fields:
    fields: Fields = {"step": job.step, "total_steps": job.total_steps, "first_step_at": job.first_step_at or ""}
    if job.preview is not None:
        fields.update(preview=job.preview, preview_step=job.preview_step)
    return fields


def finished(job: Job) -> Fields:
    """A final job's fields: its status, its result (the images one field each) or its error."""
    fields: Fields = {"status": job.status.value, "step": job.step, "total_steps": job.total_steps}
    if isinstance(job.result, UpscaleResult):
        fields.update(result=job.result.model_dump_json(exclude={"data"}), images=1)
        fields["image:0"] = job.result.data
    elif job.result is not None:
        fields["result"] = job.result.model_dump_json(exclude={"images": {"__all__": {"data"}}})
        fields["images"] = len(job.result.images)
        fields.update({f"image:{index}": image.data for index, image in enumerate(job.result.images)})
    if job.error is not None:
        fields.update(
            error_type=type(job.error).__name__, error_message=job.error.message, error_param=job.error.param or ""
        )
    if job.preview is not None:
        fields.update(preview=job.preview, preview_step=job.preview_step)
    return fields


def snapshot(job_id: str, record: dict[str, bytes | None], images: list[bytes]) -> Job:
    """A job as a reader sees it (SNAPSHOT_FIELDS, and a finished result's images)."""

    def text(name: str) -> str:
        return (record[name] or b"").decode()

    job = Job(
        job_id,
        None,
        int(record["preview_every"] or 0) or None,
        text("owner") or None,
        status=JobStatus(text("status")),
        created=float(record["created"] or 0),
        started=number(record["started"]),
        finished=number(record["finished"]),
        step=int(record["step"] or 0),
        total_steps=int(record["total_steps"] or 0),
        preview=record["preview"] or None,
        preview_step=int(record["preview_step"] or 0),
        cancel_requested_at=number(record["cancel_requested_at"]),
        stop_requested_at=number(record["stop_requested_at"]),
        version=int(record["version"] or 0),
        first_step_at=number(record["first_step_at"]),
        device=text("device") or None,
        webhook=json.loads(record["webhook"]) if record["webhook"] else None,
        webhooks={
            event: json.loads(text(f"webhook:{event}")) for event in WEBHOOK_EVENTS if record[f"webhook:{event}"]
        },
    )
    request = record["request"]
    if text("kind") == "upscale":
        job.kind = "upscale"
        job.request = upscale_request_from_json(request) if request else None
        if record["result"] and images:
            job.result = UpscaleResult.model_validate({**json.loads(record["result"]), "data": images[0]})
    else:
        job.request = request_from_json(request) if request else None
    if job.kind == "generation" and record["result"] and images:
        result = json.loads(record["result"])
        result["request"] = request_from_json(json.dumps(result["request"]))
        result["images"] = [GeneratedImage(data=data, **meta) for data, meta in zip(images, result["images"])]
        job.result = GenerationResult.model_validate(result)
    if record["error_type"]:
        error_type = ERROR_TYPES.get(text("error_type"), BackendError)
        job.error = error_type.__new__(error_type)
        BackendError.__init__(job.error, text("error_message"), text("error_param") or None)
    return job
