"""The device worker: the one loop that runs a queue's jobs on the device thread, whichever
store holds them (`JobSource`: this process's memory, or the fleet's Redis).

1. take a batch (the job whose turn it is, and the queued jobs near their turn that can share
   its pipeline call, up to the queue's `max_batch` images: turns.py), waiting for one while
   also running the calls handed to the device;
2. run it (`Engine.run_batch`: a pipeline call, or an upscale's tiles); at each step the
   source hears of the job first (a shared queue reads its flags there, and may find the job
   is no longer this device's), then the job counts the step, takes a preview and honours its cancel and stop flags;
3. finish each job by its outcome (a job cancelled at a step was finished there), keep the
   duration (for Retry-After), and tell the observer (metrics, webhooks), as at its start and
   at each of its steps.

A server may run several devices over one queue (SDXL_DEVICES): one worker each, each with its
own engine (its loaded models, its memory budget) and thread. Nothing that happens to a job or
to whoever waits for it ends a worker's loop; should it end anyway, the jobs it held fail with
a clear error, `alive` says so, and the queue serves on with the devices left (the service
reports itself dead to its probes when none is).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from backends.sdxl_backend.device_thread import DeviceThread
from backends.sdxl_backend.errors import BackendError, Cancelled
from backends.sdxl_backend.jobs.job import Job, JobResult, JobStatus, tell
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult
from backends.sdxl_backend.upscale_protocol import UpscaleResult

if TYPE_CHECKING:
    import torch

    from backends.sdxl_backend.generation.engine import Engine
    from backends.sdxl_backend.generation.progress import StepObserver

logger = logging.getLogger(__name__)


class HandedBack(Cancelled):
    """The job left this device without ending: its queue holds it again (a stopping replica,
    or one whose job was taken over). Not a cancellation of the job."""


@dataclass(frozen=True)
class ParkSeam:
    """Test seam (SDXL_TEST_PARK_FILE): while `file` exists, a job whose prompt says "park"
    waits after its first step (counted and shown), reading its cancel and stop flags every
    50 ms. A test holds a job running for as long as it needs, on any device at any speed, and
    lets it go by removing the file. Never set in production."""

    file: Path

    def hold(self, job: Job, read_flags: Callable[[], None]) -> None:
        if "park" not in (job.request.prompt if isinstance(job.request, GenerationRequest) else ""):
            return
        while self.file.exists() and job.cancel_requested_at is None and job.stop_requested_at is None:
            time.sleep(0.05)
            read_flags()


@dataclass(frozen=True)
class Device:
    """A device a worker runs jobs on: its name (as jobs and status report it: "cuda:1", or
    "cpu#0" and "cpu#1" for two shares of one CPU), its engine and the thread that owns it."""

    name: str
    engine: Engine
    thread: DeviceThread
    park: ParkSeam | None = None  # (tests only)

    @classmethod
    def alone(cls, engine: Engine) -> Device:
        """A queue's only device, made by hand (tests, benches): the engine's, on a thread of its own."""
        return cls(str(engine.models.placement.device), engine, DeviceThread())


class JobSource(Protocol):
    """What the device worker needs of a store of jobs."""

    def take(self, device: Device) -> list[Job] | None:
        """The next batch for `device`, marked running there; [] when none came in a while (or
        the device has a call to run); None once the queue is closing."""

    def before_step(self, job: Job) -> None:
        """Before a step is counted: may raise `HandedBack` (the job is no longer this device's)."""

    def after_step(self, job: Job) -> None:
        """After a step is counted: the job's progress, kept where waiters read it."""

    def finish(self, job: Job, status: JobStatus, result: JobResult | None, error: BackendError | None) -> None:
        """Settles the job (`Job.settle`) and keeps its end where waiters read it."""

    def wake(self, device: Device) -> None:
        """Ends `device`'s wait inside `take` (it has a call to run)."""


class DeviceWorker:
    def __init__(self, device: Device, source: JobSource, on_change: Callable[[Job], None] | None = None):
        self.device = device
        self.engine = device.engine
        self.source = source
        self.on_change = on_change  # told of every start, step and finish, on the device thread
        self._running: list[Job] = []  # on the device now: one job, or a batch
        self._lock = threading.Lock()
        self.recent_durations: deque[float] = deque(maxlen=20)

    def start(self) -> None:
        self.device.thread.start(self._work, lambda: self.source.wake(self.device))

    @property
    def running(self) -> list[Job]:
        """The jobs on this device now (several when batched), oldest first."""
        with self._lock:
            return list(self._running)

    @property
    def alive(self) -> bool:
        return self.device.thread.is_alive()

    def finish(
        self,
        job: Job,
        status: JobStatus,
        result: JobResult | None = None,
        error: BackendError | None = None,
    ) -> None:
        if job.status.final:  # a cancelled job of a batch, finished at its step already
            return
        self.let_go(job)  # (first: a waiter woken by the end finds the device free of it)
        self.source.finish(job, status, result, error)
        finished = job.finished or time.time()  # (set by the queue's finish)
        if job.started is not None:
            self.recent_durations.append(finished - job.started)
        if job.cancel_requested_at is not None and status == JobStatus.CANCELLED:
            logger.info(
                "job cancelled: it left the device %.3f s after the request", finished - job.cancel_requested_at
            )
        tell(self.on_change, job)

    def let_go(self, job: Job) -> None:
        with self._lock:
            if job in self._running:
                self._running.remove(job)

    def _work(self) -> None:
        try:
            while True:
                self.device.thread.run_calls()
                batch = self.source.take(self.device)
                if batch is None:
                    return
                if not batch:
                    continue
                with self._lock:
                    self._running = list(batch)  # (emptied as its jobs finish)
                try:
                    for job in batch:
                        tell(self.on_change, job)
                    self._run(batch)
                except Exception:  # the thread outlives any job: log it and take the next one
                    logger.exception(
                        "the device thread of %s caught an error around a job; it goes on", self.device.name
                    )
        except BaseException as exc:
            logger.exception("the device thread of %s stopped; the other devices serve on", self.device.name)
            for job in self.running:
                self.finish(
                    job,
                    JobStatus.FAILED,
                    error=BackendError(f"failed: device {self.device.name} stopped ({type(exc).__name__})"),
                )

    def _run(self, batch: list[Job]) -> None:
        """One pipeline call for the batch (or one upscale), then each job finished by its
        outcome (except one the step observer has let go already)."""
        try:
            outcomes = self.engine.run_batch([(job.to_run, self._observer(job)) for job in batch])
        except Exception as exc:  # a bug: the jobs fail, the queue goes on
            logger.exception("a batch failed unexpectedly")
            outcomes = [BackendError(f"internal error: {type(exc).__name__}")] * len(batch)
        for job, outcome in zip(batch, outcomes):
            if job.status != JobStatus.RUNNING:
                continue
            if isinstance(outcome, (GenerationResult, UpscaleResult)):
                outcome.device = self.device.name
                self.finish(job, JobStatus.SUCCEEDED, result=outcome)
            elif isinstance(outcome, Cancelled):
                self.finish(job, JobStatus.CANCELLED, error=outcome)
            else:
                self.finish(job, JobStatus.FAILED, error=outcome)
        if any(job.status in (JobStatus.CANCELLED, JobStatus.QUEUED) for job in batch):  # a call cut short
            self.engine.models.release_cached_memory()

    def _observer(self, job: Job) -> StepObserver:
        """The job's step observer; a cancelled job is finished at once, even while the rest of
        its batch runs on; one handed back leaves this device unfinished."""

        def on_step(step: int, total: int, latents: torch.Tensor | None) -> bool:
            try:
                self.source.before_step(job)
                stop = job.on_step(step, total, latents)
                self.source.after_step(job)
                tell(self.on_change, job)
                if self.device.park is not None and step == 1:  # (a test seam: held where its step shows)
                    self.device.park.hold(job, lambda: self.source.before_step(job))
                    stop = job.stop_requested_at is not None  # (a cancel is read at the next step)
            except HandedBack:
                self.let_go(job)
                job.status = JobStatus.QUEUED
                raise
            except Cancelled as exc:
                self.finish(job, JobStatus.CANCELLED, error=exc.copy())  # (`exc` gathers frames on its way up)
                raise
            return stop

        return on_step
