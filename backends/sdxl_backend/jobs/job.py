"""A job: one generation (or one upscale) the service runs, queued, observable and cancellable,
and what the device does to it at each step (progress, previews, cancel and early-stop flags)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from opentelemetry import propagate
from PIL import Image

from backends.sdxl_backend.device_thread import TORCH_WORK
from backends.sdxl_backend.errors import BackendError, Cancelled
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult
from backends.sdxl_backend.upscale_protocol import UpscaleRequest, UpscaleResult

if TYPE_CHECKING:  # the API layer imports this module in BentoML's main process, which needs no torch
    import torch

    from backends.sdxl_backend.generation.prepared import PreparedRequest
    from backends.sdxl_backend.generation.upscaling import PreparedUpscale

    JobWork = PreparedRequest | PreparedUpscale  # what a job runs

logger = logging.getLogger(__name__)

# SDXL latents to RGB, a linear approximation (the factors ComfyUI uses for its previews):
# good enough to watch an image form, at 1/8 of the size, for nearly nothing.
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_preview(latents: torch.Tensor) -> bytes:
    """A small PNG of the first image's latents."""
    TORCH_WORK.note("preview")
    first = latents[0].float().cpu().permute(1, 2, 0)
    rgb = first @ first.new_tensor(SDXL_LATENT_RGB) + first.new_tensor(SDXL_LATENT_RGB_BIAS)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


WEBHOOK_EVENTS = ("started", "progress", "completed")  # what a job's webhook may be told of
JobKind = Literal["generation", "upscale"]
JobResult = GenerationResult | UpscaleResult  # what a job that succeeded holds


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def trace_context() -> dict[str, str]:
    """The trace being recorded where this is called (empty when none is): a job made while a
    request is traced carries it to the replica that runs the job."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@dataclass(eq=False)
class Job:
    id: str
    prepared: JobWork | None  # what the device runs; dropped (with the input image) once finished
    preview_every: int | None = None
    owner: str | None = None  # who may see and cancel it (a digest of the API key that created it)
    status: JobStatus = JobStatus.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int = 0
    result: JobResult | None = None
    error: BackendError | None = None
    preview: bytes | None = None
    preview_step: int = 0
    cancel_requested_at: float | None = None
    stop_requested_at: float | None = None  # end the denoising early and keep the image as it stands
    version: int = 0  # bumped on every change; watchers compare it
    # Resolved (with None) when the job is final: waiters then read `result` or `error`. It
    # carries no payload, so a delivered result dropped from the job is freed. Waiters must not
    # cancel it (they wait on it without ownership); the device thread copes if one does.
    done: Future = field(default_factory=Future)
    first_step_at: float | None = None
    # Its client waits for it on its connection (a synchronous request): nobody can ask for it
    # after the worker restarts, so the memory queue does not journal it.
    waited_on: bool = False
    device: str | None = None  # the device that runs (or ran) it, once taken
    webhook: dict | None = None  # where to tell of its start or end (backends/api/jobs/webhooks.py), as submitted
    webhooks: dict[str, dict] = field(default_factory=dict)  # each event's delivery, once tried
    # The trace its maker was in (W3C traceparent), continued where it runs (backends/api/operations/tracing.py).
    trace: dict[str, str] = field(default_factory=lambda: trace_context())
    kind: JobKind = "generation"  # (taken from `prepared` when given)

    def __post_init__(self) -> None:
        # Kept after the input is dropped; None for a job recovered from the journal.
        self.request: GenerationRequest | UpscaleRequest | None = self.prepared.request if self.prepared else None
        if self.prepared is not None:
            self.total_steps = self.prepared.total_steps
            self.kind = "upscale" if self.prepared.kind == "upscale" else "generation"

    @property
    def to_run(self) -> JobWork:
        """What the device runs: a job taken from its queue has it (a final one has dropped it)."""
        if self.prepared is None:
            raise RuntimeError(f"job {self.id} has no request to run (it is {self.status})")
        return self.prepared

    @property
    def priority(self) -> str:
        return self.request.priority if isinstance(self.request, GenerationRequest) else "normal"

    @property
    def model(self) -> str | None:
        """The model it runs (an upscale's upscaler), as requested; None when unknown."""
        if isinstance(self.request, UpscaleRequest):
            return self.request.upscaler
        return self.request.model if self.request is not None else None

    @property
    def percent(self) -> float:
        if self.status == JobStatus.SUCCEEDED:
            return 100.0
        return round(100.0 * self.step / self.total_steps, 1) if self.total_steps else 0.0

    @property
    def elapsed_s(self) -> float | None:
        if self.started is None:
            return None
        return round((self.finished or time.time()) - self.started, 3)

    @property
    def eta_s(self) -> float | None:
        """Remaining denoising time, from the pace of the steps so far."""
        if self.status != JobStatus.RUNNING or self.step < 1 or self.first_step_at is None:
            return None
        pace = (time.time() - self.first_step_at) / self.step
        return round(pace * (self.total_steps - self.step), 3)

    @property
    def held_bytes(self) -> int:
        """What a finished job holds in memory: its images and its preview."""
        if isinstance(self.result, UpscaleResult):
            return len(self.result.data) + len(self.preview or b"")
        images = sum(len(image.data) for image in self.result.images) if self.result else 0
        return images + len(self.preview or b"")

    @property
    def stopped_early(self) -> bool:
        return (
            self.stop_requested_at is not None and self.status == JobStatus.SUCCEEDED and self.step < self.total_steps
        )

    def on_step(self, step: int, total: int, latents: torch.Tensor | None) -> bool:
        """Called by the engine after each denoising step, on the device thread; True: stop
        denoising here (the image is decoded as it stands)."""
        if self.cancel_requested_at is not None:
            raise Cancelled(f"job {self.id} cancelled at step {self.step} of {self.total_steps}")
        if self.first_step_at is None or step < self.step:  # first step, or an out-of-memory retry
            self.first_step_at = time.time()
        self.step, self.total_steps = step, total
        if self.preview_every and latents is not None and (step % self.preview_every == 0 or step == total):
            self.preview, self.preview_step = latent_preview(latents), step
        self.version += 1
        return self.stop_requested_at is not None

    def settle(
        self,
        status: JobStatus,
        result: JobResult | None = None,
        error: BackendError | None = None,
    ) -> None:
        """The job's end, whichever queue holds it: its outcome kept, its input dropped."""
        if error is not None:
            # A kept error keeps its message only: its traceback's frames hold the call's
            # tensors and images, its context the device's own error.
            error.__traceback__ = error.__context__ = error.__cause__ = None
        # The outcome before the status: a reader on another thread that sees the job final
        # finds its result (or error) there already.
        self.result, self.error, self.finished = result, error, time.time()
        self.status = status
        self.prepared = None  # the input image and the decoded copy go now
        self.version += 1


def tell(on_change: Callable[[Job], None] | None, job: Job) -> None:
    """Tells a queue's observer (metrics) of a change to a job; its failure is not the job's."""
    if on_change is not None:
        try:
            on_change(job)
        except Exception:
            logger.exception("a job observer failed")
