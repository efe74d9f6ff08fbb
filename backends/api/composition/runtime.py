"""The runtime: the façade every route reaches (the dialect routers through
`app.state.runtime`, the native BentoML methods through the service): settings, engine, jobs,
kept images. What it stands on is built by assembly.py.

`Runtime.run()` is how a synchronous request is served: prepared (validated) in the handler,
then handed to the job queue, which runs it as a job and awaits its end once; a client that
hangs up, or the handler being cancelled, cancels the job (hangups.py).

The job queue (`JobQueue`) is this process's (`MemoryJobQueue`), or, with `SDXL_REDIS_URL`, the
one every replica shares (`SharedJobQueue`), which waits on Redis: the routes ask about jobs
through the runtime's methods (`job`, `position`, `cancel`...), which call it off the event loop.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request

from backends.api.composition.assembly import job_webhooks, open_stores
from backends.api.composition.caller_options import MODEL_OPTION
from backends.api.composition.served import ServedAdapter, ServedModel, SideModels
from backends.api.composition.settings import Settings
from backends.api.edge import headers
from backends.api.edge.hangups import cancelled_on_hangup
from backends.api.jobs.webhook_sender import Destinations
from backends.api.jobs.webhooks import WebhookSpec
from backends.api.operations.metrics import Metrics
from backends.api.operations.tracing import JobSpans, service_tracer, tracing_config
from backends.sdxl_backend.errors import NotPermitted, QueueFull, StoreUnavailable, TimedOut
from backends.sdxl_backend.jobs import Job
from backends.sdxl_backend.jobs.contract import refuse_unless_alive
from backends.sdxl_backend.jobs.job import JobResult
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult
from backends.sdxl_backend.upscale_protocol import UpscaleRequest, UpscaleResult

if TYPE_CHECKING:
    from backends.sdxl_backend.generation.prepared import PreparedRequest
    from backends.sdxl_backend.jobs.job import JobWork
    from backends.sdxl_backend.models.records import ModelSource
    from backends.sdxl_backend.models.upscalers import UpscalerSource

logger = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        served: list[ServedModel],
        default_model: str,
        vae: Path | None = None,
        sides: SideModels = SideModels(),
    ):
        self.settings = settings
        self.served = {model.id: model for model in served}
        self.loras = {lora.id: lora for lora in sides.loras}
        self.controlnets = {controlnet.id: controlnet for controlnet in sides.controlnets}
        self.embeddings = {embedding.id: embedding for embedding in sides.embeddings}
        self.ip_adapters = {adapter.id: adapter for adapter in sides.ip_adapters}
        self.upscalers = {upscaler.id: upscaler for upscaler in sides.upscalers}
        # torch and diffusers load here, in the worker. BentoML's main process imports the service
        # module too, only to read its definition: a light module saves seconds on every start.
        from backends.api.composition.devices import Devices

        self.devices = Devices(settings, served, default_model, vae, sides)
        self.engine = self.devices.engine  # prepares and checks requests
        logger.info(
            "models: %s (default %s)%s; %s; VAE %s; %s; API keys %s",
            ", ".join(self.served),
            default_model,
            "".join(f"; alias {a} -> {t}" for a, t in settings.model_aliases.items()),
            "; ".join(f"{kind}: {', '.join(a.id for a in of) or 'none'}" for kind, of in sides.by_kind().items()),
            settings.vae or "each model's own",
            settings.fast_paths.describe(),
            "required" if settings.api_keys else "off",
        )
        self.device_type = self.engine.models.placement.device.type  # "cuda", "mps" or "cpu"
        self.metrics = Metrics(list(self.served))
        stores = open_stores(settings, self.devices.devices, self._job_changed, self.card)
        self.jobs, self.fleet, self.jobs_dir = stores.jobs, stores.fleet, stores.jobs_dir
        self.kept_images, self.caller_options = stores.kept_images, stores.caller_options
        self.comfyui_prompts = stores.comfyui_prompts
        self.tracer = service_tracer(enabled=bool(tracing_config()))
        self.job_spans = JobSpans(self.tracer, self.jobs.replica)
        self.webhook_destinations = Destinations(settings.webhook_allowed_hosts)
        self.webhooks = job_webhooks(settings, self.webhook_destinations, stores)
        self.event_streams: Counter[str] = Counter()  # SSE streams open now, per key (on the event loop only)
        self.upscales = 0  # upscales prepared, waiting or running (likewise)
        self.started = int(time.time())

    def start(self, warm_up: bool) -> None:
        """Start the device threads, and with `warm_up` wait while each loads the default model
        and runs it once (so that no request pays for either). A warm-up runs before its thread
        takes any job: on this replica, not on whichever one a shared queue would give it to."""
        warmed = self.devices.warm_up() if warm_up else []
        if self.webhooks is not None:
            self.webhooks.start()
        self.jobs.start()
        for future in warmed:
            future.result()

    @property
    def default_model(self) -> str:
        return self.engine.default_model

    @property
    def alive(self) -> bool:
        return self.jobs.alive

    def close(self) -> None:
        """A clean stop (not a crash): the jobs end here (the device thread frees the models on
        its way out), and so does the default journal."""
        self.jobs.close()
        if self.webhooks is not None:
            self.webhooks.close()
        self.kept_images.close()
        if self.jobs_dir is not None and self.settings.jobs_dir is None:
            shutil.rmtree(self.jobs_dir, ignore_errors=True)

    async def submit(
        self,
        request: GenerationRequest,
        http: Request,
        preview_every: int | None = None,
        webhook: WebhookSpec | None = None,
    ) -> Job:
        """A job whose client comes back for it: prepared (its webhook's destination checked)
        and queued in one trip off the event loop (an input image may be large, a name slow to
        resolve, Redis slow)."""
        owner = self.owner(http)
        self._check_priority(request, http)
        spec = {**webhook.model_dump(), "base_url": self.base_url(http)} if webhook else None

        def prepare_and_submit() -> Job:
            if webhook is not None:
                self.webhook_destinations.check(webhook.url)
            prepared = self._prepare(request, owner)
            refuse_unless_alive(self.jobs)
            return self.jobs.submit(prepared, owner, preview_every, spec)

        return await anyio.to_thread.run_sync(prepare_and_submit)

    async def run(self, request: GenerationRequest, http: Request) -> GenerationResult:
        """A synchronous generation: a job whose client waits for it. The client leaving, the
        handler being cancelled, or SDXL_TIMEOUT_SECONDS passing cancels the job, so the device
        moves on at its next step."""
        self._check_priority(request, http)
        owner = self.owner(http)
        prepared = await anyio.to_thread.run_sync(self._prepare, request, owner)
        result = await self._awaited(prepared, owner, http)
        assert isinstance(result, GenerationResult)  # (what a generation job ends with)
        return result

    async def upscale(self, request: UpscaleRequest, http: Request, watch_hangup: bool = True) -> UpscaleResult:
        """A synchronous upscale: a job of its own kind, awaited as `run`'s (`watch_hangup` False where
        no connection is there to watch: MCP's tool). At most SDXL_MAX_UPSCALES are prepared, waiting
        or running at once in a process (each holds its decoded image): past them, 429."""
        if self.upscales >= (most := self.settings.max_upscales):
            raise QueueFull(f"{self.upscales} upscales are waiting or running; at most {most} (SDXL_MAX_UPSCALES)", 5)
        self.upscales += 1
        try:
            prepared = await anyio.to_thread.run_sync(self.engine.upscaling.prepare, request)
            result = await self._awaited(prepared, self.owner(http), http if watch_hangup else None)
        finally:
            self.upscales -= 1
        assert isinstance(result, UpscaleResult)  # (what an upscale job ends with)
        return result

    async def _awaited(self, prepared: JobWork, owner: str | None, http: Request | None) -> JobResult:
        work = self.jobs.run(prepared, owner, self.settings.timeout_seconds)
        try:
            return await (cancelled_on_hangup(http, work) if http is not None else work)
        except TimedOut as exc:
            raise TimedOut(f"{exc.message} (SDXL_TIMEOUT_SECONDS)") from None

    def _check_priority(self, request: GenerationRequest, http: Request) -> None:
        if request.priority == "high" and headers.presented_key(http.headers) not in self.settings.priority_keys:
            raise NotPermitted("priority: 'high' is for the API keys listed in SDXL_PRIORITY_KEYS", "priority")

    def _prepare(self, request: GenerationRequest, owner: str | None) -> PreparedRequest:
        """Validated, decoded and filled in (`Engine.prepare`: a bad request fails here, never
        queued); without a `model`, the caller's default model, if it set one."""
        if request.model is None:
            request = request.model_copy(update={"model": self.default_model_for(owner)})
        if request.vram_mode is not None and not self.settings.allow_client_vram_mode:
            logger.info(
                "client asked for memory mode %s; SDXL_ALLOW_CLIENT_VRAM_MODE=0, so the server's applies",
                request.vram_mode,
            )
            request = request.model_copy(update={"vram_mode": None})
        with self.tracer.start_as_current_span("validate", attributes={"sdxl.replica": self.jobs.replica}):
            return self.engine.prepare(request)

    async def unload(self) -> list[str]:
        """Free every loaded model no request is using, on each device's thread (after the batch
        it runs, if any)."""
        return await self.devices.unload()

    def owner(self, http: Request) -> str | None:
        """Who a request acts for: with API keys set, a digest of its key (jobs belong to it);
        without keys, nobody in particular (None: every job is visible)."""
        return self.owner_of(headers.presented_key(http.headers))

    def owner_of(self, key: str | None) -> str | None:
        """The owner a presented key stands for (a socket may present it in its query)."""
        if not self.settings.api_keys:
            return None
        return hashlib.sha256((key or "").encode()).hexdigest()[:32]

    # -- the jobs, as the routes ask about them: off the event loop, since a shared queue waits
    # on Redis, which may be slow or away (3 s at most, then `StoreUnavailable`) --

    async def job(self, job_id: str, http: Request) -> Job:
        """The job, if the caller may see it (another key's job is as unknown as a missing one)."""
        return await anyio.to_thread.run_sync(self.jobs.get, job_id, self.owner(http))

    async def recent_jobs(self, http: Request, limit: int, before: float | None) -> list[Job]:
        """The caller's newest jobs first, created before `before`."""
        return await anyio.to_thread.run_sync(self.jobs.recent, limit, before, self.owner(http))

    def job_of(self, job_id: str, owner: str | None) -> Job:
        """As `job`, for an owner known otherwise (a socket's key), on a thread: the store may wait."""
        return self.jobs.get(job_id, owner)

    def recent_of(self, owner: str | None, limit: int) -> list[Job]:
        """The owner's newest jobs first, without their images, on a thread: the store may wait."""
        return self.jobs.recent(limit, None, owner, images=False)

    async def position(self, job: Job) -> int:
        return await anyio.to_thread.run_sync(self.jobs.position, job)

    async def cancel(self, job: Job) -> Job:
        """Cancels the job; returns it as it stands then."""

        def cancel_and_read() -> Job:
            self.jobs.cancel(job)
            return self.jobs.refresh(job)

        return await anyio.to_thread.run_sync(cancel_and_read)

    async def changed(self, job: Job, version: int, timeout_s: float) -> Job:
        return await self.jobs.changed(job, version, timeout_s)

    async def running_jobs(self, http: Request) -> list[Job]:
        """The running jobs the caller may see (with API keys: those its key made)."""
        owner = self.owner(http)
        running = await anyio.to_thread.run_sync(lambda: self.fleet.running)
        return [job for job in running if owner is None or job.owner == owner]

    async def progress_job(self, http: Request) -> Job | None:
        """The job A1111's /progress shows the caller: its running one, else its latest (A1111
        keeps an interrupted job's flag up until the next job begins)."""
        running = await self.running_jobs(http)
        owner = self.owner(http)
        latest = running or await anyio.to_thread.run_sync(lambda: self.jobs.recent(1, owner=owner, images=False))
        return next(iter(latest), None)

    async def interrupt(self, job: Job) -> None:
        """Ends the job's denoising at its next step, keeping the image as it stands."""
        await anyio.to_thread.run_sync(self.jobs.stop_early, job, "interrupted (A1111 interrupt or skip)")

    async def queue_status(self) -> dict[str, Any]:
        """The queue's length (fleet-wide with a shared queue) and the jobs on this device."""
        return {
            "queue_length": await anyio.to_thread.run_sync(lambda: self.fleet.queue_length),
            "jobs_on_device": len(self.jobs.running_here),
        }

    async def fleet_reads(self, recent: int) -> tuple[list[dict[str, Any]], list[Job], int]:
        """What the fleet page shows of the fleet: the other replicas' cards, the newest jobs
        (without their images) and the queue's length."""
        return await anyio.to_thread.run_sync(
            lambda: (self.fleet.replicas(), self.jobs.recent(recent, images=False), self.fleet.queue_length)
        )

    # -- the models and the device, as the routes show them --

    def model_status(self) -> dict[str, Any]:
        """Device, memory, loaded models and ControlNets (/v1/system/status): the first device's
        at the top, as a one-device server has always answered, and every device's in `devices`."""
        devices = self.devices.status()
        return {
            **{k: v for k, v in devices[0].items() if k not in ("name", "alive", "torch_threads")},
            "devices": devices,
        }

    def card(self) -> dict[str, Any]:
        """This replica as the fleet page shows it (and its heartbeat publishes it)."""
        return {
            "replica": self.jobs.replica,
            "started": self.started,
            "devices": self.devices.cards(self.jobs.running_here),
        }

    def device_memory(self) -> tuple[int, int] | None:
        """(used, total) bytes of the devices; None on the CPU."""
        return self.devices.memory()

    def is_loaded(self, model_id: str) -> bool:
        return self.devices.is_loaded(model_id)

    def model_source(self, model_id: str) -> ModelSource:
        """The served model an id (or alias) names; `UnknownModel` naming it otherwise."""
        return self.engine.models.source(model_id)

    @property
    def upscaler_sources(self) -> dict[str, UpscalerSource]:
        """The served upscale models' facts (architecture, scale), by id."""
        return self.engine.models.upscalers

    @property
    def aliases(self) -> dict[str, str]:
        """Model ids clients are hard-wired to -> the served model that answers them."""
        return self.engine.models.aliases

    @property
    def limits(self) -> Limits:
        return self.engine.limits

    async def caller_options_of(self, http: Request) -> dict[str, Any]:
        """The A1111 options the caller's key set (off the event loop: they may be in Redis)."""
        return await anyio.to_thread.run_sync(self.caller_options.get, self.owner(http) or "")

    async def set_caller_options(self, http: Request, changes: dict[str, Any]) -> None:
        await anyio.to_thread.run_sync(self.caller_options.update, self.owner(http) or "", changes)

    def default_model_for(self, owner: str | None) -> str:
        """The model a caller's requests without `model` get: the one it set through A1111's
        options (`sd_model_checkpoint`), else the server's."""
        return self.caller_options.get(owner or "").get(MODEL_OPTION) or self.default_model

    def models_fitting(self, adapter: ServedAdapter) -> list[str]:
        """The served models an adapter fits (its architecture: `ServedAdapter.fits`)."""
        return self.devices.models_fitting(adapter.fits, embedding=adapter.id in self.embeddings)

    def embedding_vectors(self) -> dict[str, int]:
        """Each served embedding's number of vectors, read from its file."""
        return {embedding_id: source.vectors for embedding_id, source in self.engine.embeddings.embeddings.items()}

    def _job_changed(self, job: Job) -> None:
        if job.status.final:
            self.metrics.observe_finished(job)
            self.job_spans.finished(job)
        if self.webhooks is not None:
            self.webhooks.changed(job)

    def device_thread_status(self) -> dict[str, Any]:
        """The device threads' torch thread counts, and which threads did each kind of torch work
        in this process (the device threads alone, when all is well)."""
        return self.devices.thread_status()

    async def observe_gauges(self) -> None:
        """The gauges, as they stand (for a scrape): each device's memory, the queue (fleet-wide
        with a shared queue) and whether its Redis answers. Redis away: `StoreUnavailable`,
        the queue gauges keeping their last values."""
        self.metrics.observe_devices(self.devices.memory_by_device())
        try:
            length, running = await anyio.to_thread.run_sync(lambda: (self.fleet.queue_length, len(self.fleet.running)))
        except StoreUnavailable:
            self.metrics.observe_redis(False)
            raise
        self.metrics.observe_queue(length, running)
        if self.settings.redis_url is not None:
            self.metrics.observe_redis(True)

    def result_headers(self, result: GenerationResult, inference_ms: bool = False) -> dict[str, str]:
        return headers.result_headers(result, self.device_type, self.devices.memory(), inference_ms)

    def base_url(self, request: Request) -> str:
        return self.settings.public_url or str(request.base_url).rstrip("/")


def runtime_of(request: Request) -> Runtime:
    """The runtime, for the dialect routers (`Depends(runtime_of)`); service.py puts it on the app."""
    return request.app.state.runtime
