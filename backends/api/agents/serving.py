"""Each MCP tool's work, on the runtime the HTTP routes use and as the caller's API key (the
`Authorization: Bearer` key the edge checked): a generation is a job, like `POST /v1/jobs`, so
that another replica's `get_job` finds it."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from PIL import Image
from pydantic import BaseModel
from starlette.requests import Request

from backends.api.agents.tools import JobId, Listing, ToolImage, ToolJob, ToolUpscale
from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.jobs.kept_images import KeptImageStore
from backends.api.operations import system
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult
from backends.sdxl_backend.upscale_protocol import UpscaleRequest

FOLLOW_S = 15.0  # longest wait for a job's next change before looking at the clock again
THUMBNAIL_PX = 160  # a preview's longer side: a PNG of at most about 75 kB, whatever the image
KEPT_PATH = "/v1/images/files/"


# A tool's arguments as tools.py makes them at start (`create_model`), read by field name.
ToolArguments = Any


class Call:
    """One tool call: its HTTP request (the key, the base of links) and the runtime."""

    def __init__(self, ctx: ServerRequestContext):
        self.ctx = ctx
        if ctx.request is None:  # (served over HTTP only: every call comes with its request)
            raise RuntimeError("an MCP call without its HTTP request")
        self.http: Request = ctx.request
        self.runtime: Runtime = runtime_of(self.http)

    async def generate_image(self, arguments: ToolArguments) -> types.CallToolResult:
        request = GenerationRequest(**arguments.model_dump(exclude={"wait"}))
        return await self._generation(request, arguments.wait)

    async def edit_image(self, arguments: ToolArguments) -> types.CallToolResult:
        kept = self.runtime.kept_images
        image = await anyio.to_thread.run_sync(image_of, arguments.image, "image", kept)
        mask = await anyio.to_thread.run_sync(image_of, arguments.mask, "mask", kept) if arguments.mask else None
        request = GenerationRequest(**arguments.model_dump(exclude={"wait", "image", "mask"}), image=image, mask=mask)
        return await self._generation(request, arguments.wait)

    async def get_job(self, arguments: JobId) -> types.CallToolResult:
        return await self._answer(await self.runtime.job(arguments.job_id, self.http))

    async def cancel_job(self, arguments: JobId) -> types.CallToolResult:
        job = await self.runtime.job(arguments.job_id, self.http)
        return await self._answer(await self.runtime.cancel(job))

    async def list_models(self, _: BaseModel) -> types.CallToolResult:
        return listing(system.model_entries(self.runtime))

    async def list_loras(self, _: BaseModel) -> types.CallToolResult:
        return listing(system.lora_entries(self.runtime))

    async def list_upscalers(self, _: BaseModel) -> types.CallToolResult:
        return listing(system.upscaler_entries(self.runtime))

    async def upscale_image(self, arguments: ToolArguments) -> types.CallToolResult:
        """The call waits for the upscale's job (as /v1/upscale does); cancelling the call
        stops it at its next tile."""
        kept = self.runtime.kept_images
        image = await anyio.to_thread.run_sync(image_of, arguments.image, "image", kept)
        request = UpscaleRequest(**arguments.model_dump(exclude={"image"}), image=image)
        result = await self.runtime.upscale(request, self.http, watch_hangup=False)
        image_id = await anyio.to_thread.run_sync(kept.put, result.data, result.media_type, "png")
        url = f"{self.runtime.base_url(self.http)}{KEPT_PATH}{image_id}"
        shown = ToolUpscale(url=url, **result.model_dump(include=set(ToolUpscale.model_fields) - {"url"}))
        preview = await anyio.to_thread.run_sync(thumbnail, result.data)
        text = f"{result.width}x{result.height} by {result.upscaler}: {url}"
        link = types.ResourceLink(
            uri=url, name=image_id, title=text, mime_type=result.media_type, size=len(result.data)
        )
        return types.CallToolResult(
            content=[
                types.TextContent(type="text", text=text),
                link,
                types.ImageContent(data=preview, mime_type="image/png"),
            ],
            structured_content=shown.model_dump(mode="json"),
        )

    async def _generation(self, request: GenerationRequest, wait: bool) -> types.CallToolResult:
        job = await self.runtime.submit(request, self.http)
        return await self._answer(await self._follow(job) if wait else job)

    async def _follow(self, job: Job) -> Job:
        """The job once it ends (or SDXL_TIMEOUT_SECONDS passed: then as it stands, for get_job),
        telling each step as MCP progress when the client asked for it. A call that is
        cancelled (the client closed its stream, or cancelled the request) cancels its job."""
        deadline = time.monotonic() + self.runtime.settings.timeout_seconds
        told = 0
        try:
            while not job.status.final and (left := deadline - time.monotonic()) > 0:
                job = await self.runtime.changed(job, job.version, min(left, FOLLOW_S))
                if job.step > told:
                    told = job.step
                    message = f"step {job.step} of {job.total_steps} (job {job.id})"
                    await self.ctx.session.report_progress(job.step, job.total_steps, message)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.runtime.cancel(job)
            raise
        return job

    async def _answer(self, job: Job) -> types.CallToolResult:
        shown = ToolJob(
            job_id=job.id,
            status=job.status,
            queue_position=await self.runtime.position(job),
            step=job.step,
            total_steps=job.total_steps,
            error=job.error.message if job.error is not None and job.status != JobStatus.SUCCEEDED else None,
        )
        content: list[Any] = []
        if job.status == JobStatus.SUCCEEDED and isinstance(job.result, GenerationResult):
            result = job.result
            ids = await anyio.to_thread.run_sync(JOB_LINKS.of, job.id, result, self.runtime.kept_images)
            urls = [f"{self.runtime.base_url(self.http)}{KEPT_PATH}{image_id}" for image_id in ids]
            shown.model = result.model
            shown.parameters = result.request.model_dump(mode="json")
            for image, url in zip(result.images, urls):
                shown.images.append(
                    ToolImage(
                        url=url, seed=image.seed, width=image.width, height=image.height, media_type=image.media_type
                    )
                )
                content.append(
                    types.ResourceLink(
                        uri=url,
                        name=url.rsplit("/", 1)[1],
                        title=f"seed {image.seed}, {image.width}x{image.height}",
                        mime_type=image.media_type,
                        size=len(image.data),
                    )
                )
                preview = await anyio.to_thread.run_sync(thumbnail, image.data)
                content.append(types.ImageContent(data=preview, mime_type="image/png"))
        content.insert(0, types.TextContent(type="text", text=summary(shown)))
        return types.CallToolResult(content=content, structured_content=shown.model_dump(mode="json"))


def listing(entries: list[dict[str, Any]]) -> types.CallToolResult:
    shown = Listing(data=entries)
    ids = ", ".join(entry["id"] for entry in entries) or "none"
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=ids)], structured_content=shown.model_dump(mode="json")
    )


def summary(job: ToolJob) -> str:
    """What a chat shows of a job's answer, in a line."""
    match job.status:
        case JobStatus.SUCCEEDED:
            sizes = ", ".join(f"{image.url} (seed {image.seed})" for image in job.images)
            return f"{len(job.images)} image(s) by {job.model}: {sizes}"
        case JobStatus.QUEUED:
            return f"job {job.job_id} is queued at position {job.queue_position}; follow it with get_job"
        case JobStatus.RUNNING:
            return f"job {job.job_id} is running (step {job.step} of {job.total_steps}); follow it with get_job"
        case _:
            return f"job {job.job_id} {job.status.value}: {job.error}"


def image_of(reference: str, field: str, kept: KeptImageStore) -> str | bytes:
    """An image argument: a link this server handed out, read from the kept images (on any
    replica, with Redis), else the base64 it is. No other URL is fetched: the server reaches
    out to nowhere an agent names."""
    if not reference.startswith(("http://", "https://")):
        return reference
    path = urlsplit(reference).path
    if KEPT_PATH not in path:
        raise InvalidRequest(
            f"{field}: only links this server handed out ({KEPT_PATH}...) are read; send other images as base64",
            field,
        )
    image = kept.get(path.rsplit("/", 1)[1])
    if image is None:
        raise InvalidRequest(f"{field}: that image link has expired or never existed", field)
    return image.data


class JobLinks:
    """The kept images behind a job's links, so that asking about a job again answers the same
    links (not a new kept copy each time) while they are kept; once they are gone, the job's
    images are kept anew, so that a link handed out lives its full time however late an agent
    asks. Remembered for the last `size` jobs in this process."""

    def __init__(self, size: int = 1000):
        self.size = size
        self._ids: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, job_id: str, result: GenerationResult, kept: KeptImageStore) -> list[str]:
        with self._lock:
            known = self._ids.get(job_id)
        if known is not None and all(kept.get(image_id) is not None for image_id in known):
            return known
        ids = [kept.put(image.data, image.media_type, result.request.output_format) for image in result.images]
        with self._lock:
            self._ids[job_id] = ids
            self._ids.move_to_end(job_id)
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)
        return ids


JOB_LINKS = JobLinks()


def thumbnail(data: bytes) -> str:
    """A small PNG preview of an image, base64."""
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        encoded = io.BytesIO()
        image.convert("RGB").save(encoded, "PNG", optimize=True)
    return base64.b64encode(encoded.getvalue()).decode()
