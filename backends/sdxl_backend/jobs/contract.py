"""`JobQueue`: what the API layer may ask of a job queue. Two stores keep it, this process's
memory (`MemoryJobQueue`) and the Redis a fleet shares (`SharedJobQueue`); tests/test_job_queues.py
runs one suite of behaviours against both. The methods that wait on a store (every one but
`run` and `changed`) are called off the event loop: Redis may be slow or away."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..errors import DeviceUnavailable
from ..protocol import GenerationResult
from .job import Job

if TYPE_CHECKING:
    from ..engine import PreparedRequest


class JobQueue(Protocol):
    def start(self) -> None:
        """Start the device worker: jobs submitted before wait for it."""

    def submit(self, prepared: PreparedRequest, owner: str | None = None, preview_every: int | None = None) -> Job:
        """Queue a job whose client will come back for it; `QueueFull` when the queue is."""

    async def run(self, prepared: PreparedRequest, owner: str | None, timeout_s: float) -> GenerationResult:
        """A job whose client waits for it: its result (forgotten by the queue once returned),
        or its error raised. Past `timeout_s` it is cancelled (`TimedOut` unless it ended
        anyway); when the awaiting task is cancelled, so is the job."""

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, if `owner` may see it (another owner's job is as unknown as a missing one);
        `UnknownJob`, or `JobExpired` for one forgotten after its time."""

    def refresh(self, job: Job) -> Job:
        """The job as it stands now."""

    async def wait(self, job: Job, timeout_s: float) -> Job:
        """The job once it is final, or as it stands after `timeout_s`."""

    async def changed(self, job: Job, version: int, timeout_s: float) -> Job:
        """The job once its version is past `version` (or it is final), or as it stands after `timeout_s`."""

    def cancel(self, job: Job, reason: str = "cancel requested") -> None:
        """A queued job never starts; a running one stops at its next step."""

    def stop_early(self, job: Job, reason: str) -> None:
        """A running job ends its denoising at the next step and succeeds with the image as it
        stands (AUTOMATIC1111's interrupt); a queued one is cancelled."""

    def position(self, job: Job) -> int:
        """1 for the next job to run, 2 after it...; 0 when not waiting."""

    def recent(self, limit: int = 50, before: float | None = None, owner: str | None = None) -> list[Job]:
        """The newest jobs first (of `owner`, when given), at most `limit`, created before `before`."""

    def forget_result(self, job: Job) -> None:
        """Drop a delivered result's images: only the record stays."""

    @property
    def queue_length(self) -> int:
        """Jobs waiting (across the fleet, for a shared queue)."""

    @property
    def running(self) -> list[Job]:
        """The jobs running (on any replica, for a shared queue), oldest first."""

    @property
    def running_here(self) -> list[Job]:
        """The jobs on this process's device."""

    @property
    def alive(self) -> bool:
        """Whether the device worker is there to run the next job."""

    def close(self) -> None:
        """Stop the device worker; what becomes of waiting and running jobs is the store's to say."""


def refuse_unless_alive(queue: JobQueue) -> None:
    """A job is refused at once when no device worker is left to run it (the probes say so too)."""
    if not queue.alive:
        raise DeviceUnavailable("the device thread has stopped; the service must be restarted")
