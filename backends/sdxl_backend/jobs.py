"""Jobs: every generation the service runs, queued, observable and cancellable.

Jobs hold requests that `Engine.prepare` has already accepted. One worker thread (the device
thread) takes them in arrival order: the oldest job, and with it the queued jobs that can share
its pipeline call (`Engine.batch_key`), up to `max_batch` images, so a waiting job is passed by
at most one batch. `Engine.generate_batch` runs them; its step callback reports each job's
progress here, hands over its latents for previews and drops a job whose cancellation was
asked for at the next step, while the others in the call go on. Nothing that happens to a job or to whoever waits
for it can end that thread; should it end anyway, `alive` says so and the service reports
itself dead to its probes. Finished jobs drop their input and are kept for a while (their
images counted against a byte budget), then forgotten; an id forgotten that way is
remembered as expired.

This queue lives in one process. Replicas that share a Redis share `SharedJobQueue`
(shared_jobs.py) instead: the same interface, the jobs in Redis.

Why not BentoML's task API (`@bentoml.task`): it runs a task to its end and reports only
pending/success/failure, so it can give neither step progress, nor a queue position, nor
stop a running generation between two denoising steps; the queue here is what those need.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PIL import Image

from .device_thread import TORCH_WORK, DeviceThread
from .errors import BackendError, Cancelled, JobExpired, QueueFull, UnknownJob
from .protocol import GenerationRequest, GenerationResult

if TYPE_CHECKING:  # the API layer imports this module in BentoML's main process, which needs no torch
    import torch

    from .engine import Engine, PreparedRequest

logger = logging.getLogger("sdxl_backend")

# SDXL latents to RGB, a linear approximation (the factors ComfyUI uses for its previews):
# good enough to watch an image form, at 1/8 of the size, for nearly nothing.
SDXL_LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                   (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))
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


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(eq=False)
class Job:
    id: str
    prepared: PreparedRequest | None  # what the device runs; dropped (with the input image) once finished
    preview_every: int | None = None
    owner: str | None = None  # who may see and cancel it (a digest of the API key that created it)
    status: JobStatus = JobStatus.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int = 0
    result: GenerationResult | None = None
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
    _first_step_at: float | None = None

    def __post_init__(self) -> None:
        # Kept after the input is dropped; None for a job recovered from the journal.
        self.request: GenerationRequest | None = self.prepared.request if self.prepared else None
        if self.prepared is not None:
            self.total_steps = self.prepared.total_steps

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
        if self.status != JobStatus.RUNNING or self.step < 1 or self._first_step_at is None:
            return None
        pace = (time.time() - self._first_step_at) / self.step
        return round(pace * (self.total_steps - self.step), 3)

    @property
    def held_bytes(self) -> int:
        """What a finished job holds in memory: its images and its preview."""
        images = sum(len(image.data) for image in self.result.images) if self.result else 0
        return images + len(self.preview or b"")

    @property
    def stopped_early(self) -> bool:
        return self.stop_requested_at is not None and self.status == JobStatus.SUCCEEDED and self.step < self.total_steps

    def on_step(self, step: int, total: int, latents: torch.Tensor | None) -> bool:
        """Called by the engine after each denoising step, on the device thread; True: stop
        denoising here (the image is decoded as it stands)."""
        if self.cancel_requested_at is not None:
            raise Cancelled(f"job {self.id} cancelled at step {self.step} of {self.total_steps}")
        if self._first_step_at is None or step < self.step:  # first step, or an out-of-memory retry
            self._first_step_at = time.time()
        self.step, self.total_steps = step, total
        if self.preview_every and latents is not None and (step % self.preview_every == 0 or step == total):
            self.preview, self.preview_step = latent_preview(latents), step
        self.version += 1
        return self.stop_requested_at is not None


def tell(on_change: Callable[[Job], None] | None, job: Job) -> None:
    """Tells a queue's observer (metrics) of a change to a job; its failure is not the job's."""
    if on_change is not None:
        try:
            on_change(job)
        except Exception:
            logger.exception("a job observer failed")


def run_batch(engine: Engine, batch: list[Job], observer: Callable[[Job], Callable],
              finish: Callable[..., None]) -> None:
    """The device's part, whichever queue the jobs came from: one pipeline call for the batch,
    then each job finished by its outcome (except one the step observer has let go already:
    finished at a step by a cancel, or handed back to a shared queue)."""
    try:
        outcomes = engine.generate_batch([(job.prepared, observer(job)) for job in batch])
    except Exception as exc:  # a bug: the jobs fail, the queue goes on
        logger.exception("a batch failed unexpectedly")
        outcomes = [BackendError(f"internal error: {type(exc).__name__}")] * len(batch)
    for job, outcome in zip(batch, outcomes):
        if job.status != JobStatus.RUNNING:
            continue
        if isinstance(outcome, GenerationResult):
            finish(job, JobStatus.SUCCEEDED, result=outcome)
        elif isinstance(outcome, Cancelled):
            finish(job, JobStatus.CANCELLED, error=outcome)
        else:
            finish(job, JobStatus.FAILED, error=outcome)
    if any(job.status in (JobStatus.CANCELLED, JobStatus.QUEUED) for job in batch):  # a call cut short
        engine.models.release_cached_memory()


class JobJournal:
    """One small file per job held (its status, owner, times, error), so that a restarted
    worker still answers for the ids the one before handed out: a job that was queued or
    running then is failed with a message that says so. Images are not journalled."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, job: Job) -> None:
        record = {"status": job.status.value, "owner": job.owner, "created": job.created, "started": job.started,
                  "finished": job.finished, "step": job.step, "total_steps": job.total_steps,
                  "error": job.error.message if job.error else None}
        temporary = self.directory / f".{job.id}.tmp"
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self.directory / job.id)

    def forget(self, job_id: str) -> None:
        (self.directory / job_id).unlink(missing_ok=True)

    def recover(self) -> list[Job]:
        """The jobs of the worker before, oldest first; unfinished ones failed (and rewritten)."""
        jobs = []
        for file in self.directory.iterdir():
            if file.name.startswith("."):
                continue
            try:
                record = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            status = JobStatus(record["status"])
            job = Job(file.name, None, owner=record["owner"], created=record["created"], started=record["started"],
                      finished=record["finished"], step=record["step"], total_steps=record["total_steps"])
            if status.final:
                job.status = status
                job.error = BackendError(record["error"]) if record["error"] else None
                if status == JobStatus.SUCCEEDED:  # its images were in the lost worker's memory
                    job.error = BackendError("the worker restarted after this job succeeded; its images are lost")
            else:
                job.status, job.finished = JobStatus.FAILED, time.time()
                job.error = BackendError(f"failed: the worker restarted while this job was {status.value}")
                self.write(job)
            jobs.append(job)
        return sorted(jobs, key=lambda job: job.created)


class JobQueue:
    """The bounded, first-come-first-served queue in front of the device."""

    def __init__(self, engine: Engine, max_queue: int = 64, ttl_s: float = 3600, max_jobs: int = 1000,
                 max_bytes: int = 512 * 2**20, on_change: Callable[[Job], None] | None = None,
                 journal: JobJournal | None = None, max_batch: int = 1, device: DeviceThread | None = None):
        self.engine = engine
        self.device = device or DeviceThread()  # runs `_work`, and whatever else needs the device
        self.max_batch = max_batch  # images in one pipeline call, from several jobs; 1: each job alone
        self.journal = journal
        self.on_change = on_change  # told of every submit, start and finish (metrics), on the thread that did it
        self.max_queue = max_queue
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._jobs: dict[str, Job] = {}  # every job held
        self._queue: deque[Job] = deque()
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in the order they finished
        self._finished_bytes = 0
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._recent_durations: deque[float] = deque(maxlen=20)
        self._running: list[Job] = []  # on the device now: one job, or a batch
        self._closing = False
        self._lock = threading.Condition()
        for job in journal.recover() if journal else []:
            self._jobs[job.id] = self._finished[job.id] = job
        if self._finished:
            logger.warning("%d job(s) of a previous worker found; those unfinished are marked failed", len(self._finished))

    def start(self) -> None:
        """Start the device thread: jobs submitted before wait for it."""
        self.device.start(self._work, self._wake)

    def submit(self, prepared: PreparedRequest, preview_every: int | None = None, owner: str | None = None) -> Job:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later", self.retry_after_s())
            job = Job(secrets.token_hex(16), prepared, preview_every, owner)
            self._jobs[job.id] = job
            self._queue.append(job)
            if self.journal:
                self.journal.write(job)
            self._lock.notify_all()
        tell(self.on_change, job)
        return job

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, if `owner` may see it: another owner's job is as unknown as a missing one."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
            if job is not None and (owner is None or job.owner == owner):
                return job
            if job is None and job_id in self._expired:
                raise JobExpired(f"job {job_id} has expired and was deleted", "job_id")
            raise UnknownJob(f"no job {job_id}", "job_id")

    def refresh(self, job: Job) -> Job:
        """The job as it stands now: the object itself, which the device thread keeps current."""
        return job

    async def wait(self, job: Job, timeout_s: float) -> Job:
        """The job once it is final, or as it stands after `timeout_s`."""
        # asyncio.wait never cancels what it waits on: job.done stays the device thread's.
        await asyncio.wait({asyncio.wrap_future(job.done)}, timeout=None if math.isinf(timeout_s) else timeout_s)
        return job

    async def changed(self, job: Job, version: int, timeout_s: float) -> Job:
        """The job once its version is past `version` (or it is final), or as it stands after
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while job.version == version and not job.status.final and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # (the device thread changes the job in memory: looking costs nothing)
        return job

    def recent(self, limit: int = 50, before: float | None = None, owner: str | None = None) -> list[Job]:
        """The newest jobs first (of `owner`, when given), at most `limit`, created before `before`."""
        with self._lock:
            self._expire()
            jobs = sorted(self._jobs.values(), key=lambda job: job.created, reverse=True)
        return [job for job in jobs if (before is None or job.created < before)
                and (owner is None or job.owner == owner)][:limit]

    def position(self, job: Job) -> int:
        """1 for the next job to run, 2 after it...; 0 when not waiting."""
        with self._lock:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return 0

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[Job]:
        """The jobs on the device now (several when batched), oldest first."""
        return list(self._running)

    @property
    def running_here(self) -> list[Job]:
        """The jobs on this process's device: all that run (the shared queue tells them apart)."""
        return self.running

    @property
    def alive(self) -> bool:
        """Whether the device thread is there to run the next job."""
        return self.device.is_alive()

    def retry_after_s(self) -> int:
        """Seconds until the queue has room again: the recent jobs' mean duration times the
        jobs ahead (the running one and those waiting)."""
        mean = sum(self._recent_durations) / len(self._recent_durations) if self._recent_durations else 5.0
        ahead = len(self._queue) + bool(self._running)
        return max(1, round(mean * max(1, ahead) / max(1, self.max_queue)))

    def cancel(self, job: Job, reason: str = "cancel requested") -> None:
        """A queued job never starts; a running one stops at its next step."""
        with self._lock:
            if job.status.final or job.cancel_requested_at is not None:
                return
            job.cancel_requested_at = time.time()
            logger.info("job %s while %s", reason, job.status)
            if job.status == JobStatus.QUEUED:
                self._queue.remove(job)
                self._finish(job, JobStatus.CANCELLED, error=Cancelled(f"job {job.id} cancelled before it started"))

    def stop_early(self, job: Job, reason: str) -> None:
        """A running job ends its denoising at the next step and succeeds with the image as it
        stands (AUTOMATIC1111's interrupt); a queued one is cancelled."""
        with self._lock:
            if job.status == JobStatus.QUEUED:
                self.cancel(job, reason)
            elif job.status == JobStatus.RUNNING and job.stop_requested_at is None:
                job.stop_requested_at = time.time()
                logger.info("job %s at step %d of %d", reason, job.step, job.total_steps)

    def forget_result(self, job: Job) -> None:
        """Drop a delivered result's images (synchronous requests): only the record stays."""
        with self._lock:
            if job.result is not None and job.id in self._finished:
                self._finished_bytes -= job.held_bytes
                job.result, job.preview = None, None
                self._finished_bytes += job.held_bytes

    def close(self) -> None:
        """Cancel what waits, let the running job stop at its next step, end the device thread."""
        with self._lock:
            self._closing = True
            for job in list(self._queue):
                self.cancel(job, "cancelled: the server is shutting down")
            for job in self._running:
                self.cancel(job, "cancelled: the server is shutting down")
            self._lock.notify_all()
        if self.device.ident is not None:
            self.device.join(timeout=30)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            self.device.run_calls()
            with self._lock:
                while not self._queue and not self._closing and not self.device.pending:
                    self._lock.wait()
                if self._closing:
                    return
                if not self._queue:  # (woken for a call)
                    continue
                batch = self._take_batch()
                self._running = list(batch)  # (emptied as its jobs finish)
                for job in batch:
                    job.status, job.started = JobStatus.RUNNING, time.time()
                    job.version += 1
                    if self.journal:
                        self.journal.write(job)
            try:
                for job in batch:
                    tell(self.on_change, job)
                run_batch(self.engine, batch, self._observer, self._finish)
            except BaseException:  # the thread outlives any job: log it and take the next one
                logger.exception("the device thread caught an error around a job; it goes on")

    def _take_batch(self) -> list[Job]:
        """The oldest job, and the queued jobs that can share its call, in arrival order, while
        their images fit in `max_batch`. Called with the lock held."""
        head = self._queue.popleft()
        batch, images = [head], head.prepared.request.n
        key = self.engine.batch_key(head.prepared) if images < self.max_batch else None
        if key is not None:
            for job in list(self._queue):
                n = job.prepared.request.n
                if images + n <= self.max_batch and self.engine.batch_key(job.prepared) == key:
                    self._queue.remove(job)
                    batch.append(job)
                    images += n
                    if images == self.max_batch:
                        break
        return batch

    def _observer(self, job: Job) -> Callable:
        """The job's step observer; a cancelled job is finished at once, even while the rest
        of its batch runs on."""
        def on_step(step: int, total: int, latents: torch.Tensor | None) -> bool:
            try:
                return job.on_step(step, total, latents)
            except Cancelled as exc:
                self._finish(job, JobStatus.CANCELLED, error=exc.copy())  # (`exc` gathers frames on its way up)
                raise
        return on_step

    def _finish(self, job: Job, status: JobStatus, result: GenerationResult | None = None,
                error: BackendError | None = None) -> None:
        with self._lock:
            if job.status.final:  # a cancelled job of a batch, finished at its step already
                return
            if job in self._running:
                self._running.remove(job)
            if error is not None:
                # A kept error keeps its message only: its traceback's frames hold the call's
                # tensors and images, its context the device's own error.
                error.__traceback__ = error.__context__ = error.__cause__ = None
            job.status, job.result, job.error, job.finished = status, result, error, time.time()
            job.prepared = None  # the input image and the decoded copy go now
            job.version += 1
            if job.started is not None:
                self._recent_durations.append(job.finished - job.started)
            if job.cancel_requested_at is not None and status == JobStatus.CANCELLED:
                logger.info("job cancelled: it left the device %.3f s after the request",
                            job.finished - job.cancel_requested_at)
            self._finished[job.id] = job
            self._finished_bytes += job.held_bytes
            if self.journal:
                self.journal.write(job)
            self._expire()
        try:
            job.done.set_result(None)
        except InvalidStateError:  # its waiter cancelled the future: nobody is left to tell
            pass
        tell(self.on_change, job)

    def _expire(self) -> None:
        """Forget finished jobs past their time, beyond the count, or beyond the bytes: the
        oldest first, looking at no more jobs than it forgets."""
        now = time.time()
        while self._finished:
            job = next(iter(self._finished.values()))
            if (now - job.finished <= self.ttl_s and len(self._finished) <= self.max_jobs
                    and self._finished_bytes <= self.max_bytes):
                break
            del self._finished[job.id], self._jobs[job.id]
            self._finished_bytes -= job.held_bytes
            self._expired[job.id] = None
            if self.journal:
                self.journal.forget(job.id)
        while len(self._expired) > 100_000:
            self._expired.popitem(last=False)
