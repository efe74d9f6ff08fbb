"""The SDXL service: BentoML wiring and the HTTP routes.

A request enters at a route below, becomes a `GenerationRequest` (the native API takes one as
its body; other dialects translate theirs in backends/api/), runs on the device in
`Engine.generate()` (backends/sdxl_backend/engine.py), and the `GenerationResult` is shaped
back into the dialect's answer (backends/api/). Settings come from the environment
(backends/api/settings.py); the README lists them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import bentoml
import diffusers
import transformers
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from backends.api import a1111, errors, headers, image_generations, jobs, native
from backends.api.auth import ApiKeyMiddleware
from backends.api.kept_images import KeptImages
from backends.api.settings import DEFAULTS, ServiceSettings
from backends.sdxl_backend.device import device_memory, select_placement
from backends.sdxl_backend.engine import Engine, OutOfMemorySeam
from backends.sdxl_backend.errors import BackendError, InvalidRequest, QueueFull
from backends.sdxl_backend.jobs import Job, JobQueue
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.model_manager import MemoryPolicy, ModelManager, ModelSource
from backends.sdxl_backend.pipelines import MEMORY_MODES
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult
from backends.sdxl_backend.schedulers import SCHEDULERS
from models.catalog import defaults_for, load_catalog
from models.store import stored_models

logger = logging.getLogger("sdxl_backend")
SETTINGS = ServiceSettings.from_env()
# Routes open without an API key: health probes, and kept-image links (unguessable, and
# fetched by browsers that cannot send a key). Everything else, /sdapi/ included, needs one.
OPEN_PATHS = ("/health",)
OPEN_PREFIXES = ("/v1/images/files/",)


def served_models() -> dict[str, bentoml.Model]:
    """`SDXL_MODELS`, or every SDXL model in the store."""
    stored = stored_models()
    missing = [m for m in SETTINGS.models if m not in stored]
    if missing:
        raise RuntimeError(
            f"SDXL_MODELS names {', '.join(missing)}, not in the model store; "
            f"import with `python -m models import ID` (stored: {', '.join(stored) or 'none'})"
        )
    if not stored:
        raise RuntimeError("the model store holds no SDXL model: run `python -m models import tiny-sdxl` (or sdxl-base)")
    return {m: stored[m] for m in SETTINGS.models} if SETTINGS.models else stored


def default_model(served: list[str]) -> str:
    """`SDXL_DEFAULT_MODEL`, else the first served model in catalog order."""
    if SETTINGS.default_model:
        if SETTINGS.default_model not in served:
            raise RuntimeError(f"SDXL_DEFAULT_MODEL={SETTINGS.default_model} is not served (served: {', '.join(served)})")
        return SETTINGS.default_model
    order = list(load_catalog())
    return min(served, key=lambda m: order.index(m) if m in order else len(order))


def model_attribute(model_id: str) -> str:
    return "model_" + model_id.replace("-", "_").replace(".", "_")


SERVED = served_models()
DEFAULT_MODEL = default_model(list(SERVED))

# BentoML's own OpenAPI UI (at /) documents these routes; FastAPI's second copy is off.
app = FastAPI(title="SDXL", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(BackendError)
async def _backend_error(_: Request, exc: BackendError) -> JSONResponse:
    status, body = errors.backend_error(exc)
    retry = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
    return JSONResponse(body, status_code=status, headers=retry)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    status, body = errors.validation_error(exc.errors())
    return JSONResponse(body, status_code=status)


app.add_middleware(
    ApiKeyMiddleware,
    keys=SETTINGS.api_keys,
    open_paths=OPEN_PATHS,
    open_prefixes=OPEN_PREFIXES,
    unauthorized_body=errors.error_body(
        "missing or invalid API key: send Authorization: Bearer <key> or X-API-Key", "authentication_error",
        code="invalid_api_key",
    ),
)


class SDXL:
    def __init__(self) -> None:
        # Backend logs go where BentoML's go (its root handler); progress bars do not.
        logger.setLevel(logging.INFO)
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        placement = select_placement()
        logger.info(
            "device: %s; models: %s (default %s)%s; API keys %s",
            placement.describe(), ", ".join(SERVED), DEFAULT_MODEL,
            "".join(f"; alias {a} -> {t}" for a, t in SETTINGS.aliases.items()),
            "required" if SETTINGS.api_keys else "off",
        )
        sources = [
            ModelSource(model_id, Path(getattr(self, model_attribute(model_id)).path), defaults_for(model_id))
            for model_id in SERVED
        ]
        models = ModelManager(sources, placement, SETTINGS.aliases, MemoryPolicy.from_env())
        oom_seam = OutOfMemorySeam.parse(SETTINGS.test_fault_oom)
        if oom_seam:
            logger.warning("TEST SEAM ACTIVE: SDXL_TEST_FAULT_OOM=%s makes generations fail", SETTINGS.test_fault_oom)
        self.engine = Engine(models, DEFAULT_MODEL, Limits.from_env(), oom_seam)
        self.jobs = JobQueue(self.engine, SETTINGS.max_queue, SETTINGS.job_ttl_s, SETTINGS.max_jobs,
                             SETTINGS.job_max_bytes)
        self.kept_images = KeptImages(SETTINGS.image_url_ttl_s, SETTINGS.image_url_max_bytes)
        self.kept_images.sweep_forever(min(60.0, SETTINGS.image_url_ttl_s))
        if SETTINGS.warmup:
            started = time.perf_counter()
            self.jobs.submit(GenerationRequest(prompt="warm-up", steps=2)).done.result()
            logger.info("warm-up of %s done in %.2f s", DEFAULT_MODEL, time.perf_counter() - started)

    def _submit(self, request: GenerationRequest, preview_every: int | None = None) -> Job:
        if request.vram_mode is not None and not SETTINGS.client_vram_mode:
            logger.info("client asked for memory mode %s; SDXL_ALLOW_CLIENT_VRAM_MODE=0, so the server's applies",
                        request.vram_mode)
            request = request.model_copy(update={"vram_mode": None})
        return self.jobs.submit(request, preview_every)

    async def _run(self, request: GenerationRequest, http: Request) -> tuple[GenerationResult, dict[str, str]]:
        """A synchronous generation: a job whose client waits for it. When the client goes
        away the job is cancelled, so the device moves on to the next request."""
        job = self._submit(request)
        waiter = asyncio.wrap_future(job.done)
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=0.25)
            if not waiter.done() and await http.is_disconnected():
                self.jobs.cancel(job, "client disconnected")
                break
        result = await waiter
        self.jobs.forget_result(job)  # delivered now: the images are the client's, not ours to keep
        placement = self.engine.models.placement
        return result, headers.result_headers(result, placement.device.type, device_memory(placement))

    # --- the native API -------------------------------------------------------------------

    @app.post("/v1/txt2img")
    async def txt2img(self, body: GenerationRequest, request: Request) -> Response:
        """Text to image. With `Accept: image/png` (or jpeg/webp) and n=1 the answer is the image itself."""
        if body.image is not None:
            raise InvalidRequest("image: txt2img takes no input image; use /v1/img2img", "image")
        return await self._native(body, request)

    @app.post("/v1/img2img")
    async def img2img(self, body: GenerationRequest, request: Request) -> Response:
        """Image to image: `image` (base64, a data URL is fine) repainted by `strength`."""
        if body.image is None:
            raise InvalidRequest("image: img2img needs an input image (base64)", "image")
        return await self._native(body, request)

    async def _native(self, body: GenerationRequest, request: Request) -> Response:
        raw = native.wants_raw_image(request.headers.get("accept"))
        if raw and body.n != 1:
            raise InvalidRequest("n: a raw image answer (Accept: image/*) holds one image; ask for JSON", "n")
        result, result_headers = await self._run(body, request)
        if raw:
            image = result.images[0]
            return Response(image.data, media_type=image.media_type, headers=result_headers)
        return JSONResponse(native.result_body(result, int(time.time())), headers=result_headers)

    # --- moondream-station and OpenAI Images clients ----------------------------------------

    @app.post("/v1/generate")
    @app.post("/v1/images/generations")
    async def generate(
        self,
        body: image_generations.ImageGenerationRequest,
        request: Request,
        x_vram_mode: str | None = Header(None),
    ) -> JSONResponse:
        """moondream-station's /v1/generate and the OpenAI Images API, one handler: the union
        of both request shapes in, the union of both answers out. `image` makes it img2img."""
        if x_vram_mode is not None and x_vram_mode not in MEMORY_MODES:
            raise InvalidRequest(f"X-VRAM-Mode: '{x_vram_mode}' is not one of {', '.join(MEMORY_MODES)}", "X-VRAM-Mode")
        result, result_headers = await self._run(body.to_generation_request(x_vram_mode), request)
        urls = None
        if body.response_format == "url":
            base = self._base_url(request)
            urls = [
                f"{base}/v1/images/files/{self.kept_images.put(image.data, image.media_type, result.request.output_format)}"
                for image in result.images
            ]
        answer = image_generations.render(body, result, int(time.time()), urls)
        return JSONResponse(answer, headers=result_headers)

    @app.get("/v1/images/files/{image_id}")
    async def kept_image(self, image_id: str) -> Response:
        """An image answered with response_format "url", while it is kept."""
        image = self.kept_images.get(image_id)
        if image is not None:
            return Response(image.data, media_type=image.media_type)
        if self.kept_images.expired(image_id):
            return JSONResponse(errors.error_body(f"image {image_id} has expired", "gone", code="expired"), 410)
        return JSONResponse(errors.error_body(f"no image {image_id}", "not_found", code="not_found"), 404)

    # --- AUTOMATIC1111 clients --------------------------------------------------------------

    @app.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(self, body: a1111.A1111Request, request: Request) -> dict:
        result, _ = await self._run(body.to_generation_request(img2img=False), request)
        return a1111.render(body, result)

    @app.post("/sdapi/v1/img2img")
    async def a1111_img2img(self, body: a1111.A1111Request, request: Request) -> dict:
        result, _ = await self._run(body.to_generation_request(img2img=True), request)
        return a1111.render(body, result)

    @app.get("/sdapi/v1/sd-models")
    async def a1111_models(self) -> list[dict]:
        return [{"title": model_id, "model_name": model_id, "hash": model.tag.version[:10], "sha256": None,
                 "filename": model_id, "config": None} for model_id, model in SERVED.items()]

    @app.get("/sdapi/v1/samplers")
    async def a1111_samplers(self) -> list[dict]:
        return a1111.samplers()

    @app.get("/sdapi/v1/options")
    async def a1111_options(self) -> dict:
        return {"sd_model_checkpoint": DEFAULT_MODEL}

    @app.get("/sdapi/v1/progress")
    async def a1111_progress(self, skip_current_image: bool = False) -> dict:
        return a1111.progress(self.jobs.running, preview=not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def a1111_interrupt(self) -> dict:
        """Stops the running generation at its next step, as A1111's interrupt does."""
        job = self.jobs.running
        if job is not None:
            self.jobs.cancel(job, "interrupted (/sdapi/v1/interrupt)")
        return {}

    # --- jobs -------------------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=202)
    async def submit_job(self, body: jobs.JobRequest, request: Request) -> JSONResponse:
        """The native body (an `image` makes it img2img), answered at once with the job."""
        job = self._submit(body.generation_request(), body.preview_every)
        answer = jobs.job_body(job, self.jobs.position(job), self._base_url(request))
        return JSONResponse(answer, status_code=202, headers={"Location": answer["links"]["self"]})

    @app.get("/v1/jobs")
    async def list_jobs(self, request: Request) -> dict:
        base = self._base_url(request)
        return {"jobs": [jobs.job_body(job, self.jobs.position(job), base) for job in self.jobs.recent()]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> JSONResponse:
        job = self.jobs.get(job_id)
        return JSONResponse(jobs.job_body(job, self.jobs.position(job), self._base_url(request)))

    @app.delete("/v1/jobs/{job_id}")
    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel_job(self, job_id: str, request: Request) -> JSONResponse:
        """A queued job never starts; a running one stops at its next step. Cancelling a
        finished job changes nothing."""
        job = self.jobs.get(job_id)
        self.jobs.cancel(job)
        return JSONResponse(jobs.job_body(job, self.jobs.position(job), self._base_url(request)))

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(self, job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: `progress` (and `preview`) while it runs, then `result`,
        `error` or `cancelled`, then the stream ends."""
        job, base = self.jobs.get(job_id), self._base_url(request)

        async def stream():
            seen, preview_step = -1, 0
            while True:
                version, final = job.version, job.status in jobs.FINAL
                if version != seen:
                    seen = version
                    for event in jobs.progress_events(job, self.jobs.position(job), preview_step):
                        yield event
                    preview_step = job.preview_step
                if final:
                    yield jobs.final_event(job, base)
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/preview")
    async def job_preview(self, job_id: str) -> Response:
        job = self.jobs.get(job_id)
        if job.preview is None:
            raise InvalidRequest("preview: this job has no preview yet (submit with preview_every)", "preview_every")
        return Response(job.preview, media_type="image/png", headers={"X-Preview-Step": str(job.preview_step)})

    @staticmethod
    def _base_url(request: Request) -> str:
        return SETTINGS.public_url or str(request.base_url).rstrip("/")

    # --- companion routes -------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "server": "sdxl-bento", "default_model": DEFAULT_MODEL}

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        catalog = load_catalog()
        models = self.engine.models

        def entry(model_id: str, served_by: str) -> dict:
            return {
                "id": model_id,
                "name": model_id,
                "description": catalog[served_by].description if served_by in catalog else "",
                "version": SERVED[served_by].tag.version,
                "loaded": models.is_loaded(served_by),
                "default": model_id == DEFAULT_MODEL,
                **({"alias_of": served_by} if served_by != model_id else {}),
            }

        return {
            "models": [entry(m, m) for m in SERVED] + [entry(alias, target) for alias, target in models.aliases.items()]
        }

    @app.get("/v1/schedulers")
    @app.get("/v1/samplers")
    async def list_schedulers(self) -> dict:
        schedulers = [{"name": name, "label": spec.label} for name, spec in SCHEDULERS.items()]
        return {"schedulers": schedulers, "samplers": schedulers}

    @app.get("/v1/system/status")
    async def system_status(self) -> dict:
        """Device, memory (bytes), loaded models (most recently used first) and the queue."""
        return {**self.engine.models.status(), "queue_length": self.jobs.queue_length}

    @app.post("/v1/system/unload")
    async def unload(self) -> dict:
        """Free every loaded pipeline; the next request loads its model again."""
        unloaded = await asyncio.to_thread(self.engine.models.unload)
        return {"status": "ok", "unloaded": unloaded}


# BentoML finds the models a service uses among its class attributes, and `bentoml build` packs
# those. The served set is known only now, so the attributes are set before the class becomes
# a service (which is why the decorators are applied by hand).
for _model_id, _model in SERVED.items():
    setattr(SDXL, model_attribute(_model_id), bentoml.models.BentoModel(_model.tag))
SDXL = bentoml.service(
    name="sdxl",
    # The image `bentoml containerize` builds: no distro packages (no compiler or git left in
    # it: every dependency is a wheel), the pinned requirements, CUDA-enabled torch from PyPI.
    image=bentoml.images.Image(base_image="python:3.11-slim", distro="none", python_version="3.11")
    .requirements_file("requirements.txt"),
    envs=[{"name": name, "value": value} for name, value in DEFAULTS.items()],
    resources={"gpu": 1},
    workers=1,
    traffic={"timeout": SETTINGS.timeout_s},
    http={
        "cors": {
            "enabled": True,
            "access_control_allow_origins": SETTINGS.cors_origins,
            "access_control_allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
            "access_control_allow_headers": ["*"],
            "access_control_expose_headers": headers.EXPOSED,
        }
    },
)(bentoml.asgi_app(app)(SDXL))
