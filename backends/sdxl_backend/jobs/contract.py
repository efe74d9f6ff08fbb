"""What the API layer may ask of a store of jobs, in three contracts: `JobQueue` (the jobs:
submit, run, look, cancel), `WebhookLedger` (which webhook events are being delivered, so that
another replica delivers those of one that stopped) and `FleetView` (the queue and the replicas
as a whole). Two stores keep all three, this process's memory (`MemoryJobQueue`) and the Redis a
fleet shares (`SharedJobQueue`); tests/test_job_queues.py runs one suite of behaviours against
both. The methods that wait on a store (every one but `run` and `changed`) are called off the
event loop: Redis may be slow or away."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from backends.sdxl_backend.errors import DeviceUnavailable, QueueFull
from backends.sdxl_backend.jobs.job import Job, JobResult

if TYPE_CHECKING:
    from backends.sdxl_backend.jobs.job import JobWork
    from backends.sdxl_backend.jobs.turns import QueueBounds
    from backends.sdxl_backend.jobs.worker import DeviceWorker


class JobQueue(Protocol):
    """The jobs: submitted or run, looked at, cancelled; and the device workers that run them."""

    replica: str  # this process's name among the replicas (host:pid, with a suffix when shared)

    def start(self) -> None:
        """Start the device worker: jobs submitted before wait for it."""

    def submit(
        self,
        prepared: JobWork,
        owner: str | None = None,
        preview_every: int | None = None,
        webhook: dict | None = None,
    ) -> Job:
        """Queue a job whose client will come back for it; `QueueFull` when the queue is, or
        when its owner has as many jobs waiting as one owner may."""

    async def run(self, prepared: JobWork, owner: str | None, timeout_s: float) -> JobResult:
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
        """1 for the next job to run, 2 after it... in turn order (turns.py: it can move as
        others arrive); 0 when not waiting."""

    def retry_after_s(self) -> int:
        """Seconds until a full queue has room again."""

    def recent(
        self, limit: int = 50, before: float | None = None, owner: str | None = None, images: bool = True
    ) -> list[Job]:
        """The newest jobs first (of `owner`, when given), at most `limit`, created before `before`;
        without `images`, a shared queue leaves the results' images in Redis (`result` None)."""

    def forget_result(self, job: Job) -> None:
        """Drop a delivered result's images: only the record stays."""

    @property
    def running_here(self) -> list[Job]:
        """The jobs on this process's devices."""

    @property
    def workers(self) -> list[DeviceWorker]:
        """This process's device workers, one per device."""

    @property
    def alive(self) -> bool:
        """Whether a device worker is there to run the next job."""

    def close(self) -> None:
        """Stop the device workers; what becomes of waiting and running jobs is the store's to say."""


class WebhookLedger(Protocol):
    """Webhook events held while they are delivered, and their outcomes kept on their jobs."""

    def hold_webhook(self, job_id: str, event: str, message_id: str) -> None:
        """A webhook event about to be delivered by this process, held until its outcome is
        recorded: if the process dies first, another replica delivers it (`orphaned_webhooks`)."""

    def record_webhook(self, job_id: str, event: str, outcome: dict) -> None:
        """Keep on the job (if it is still held) how its webhook's `event` was delivered, and let
        go of the event's hold."""

    def orphaned_webhooks(self) -> list[tuple[Job, str, str]]:
        """The held webhook events of replicas that stopped, now this one's to deliver: (job,
        event, message id), each claimed by one replica."""


class FleetView(Protocol):
    """The queue and the replicas as a whole (a shared queue's across the fleet)."""

    replica: str

    def replicas(self) -> list[dict]:
        """The cards the live replicas published with their heartbeats (what each serves and
        runs: backends/api/operations/fleet.py); none without a shared queue."""

    @property
    def queue_length(self) -> int:
        """Jobs waiting (across the fleet, for a shared queue)."""

    @property
    def running(self) -> list[Job]:
        """The jobs running (on any replica, for a shared queue), oldest first."""


def refuse_unless_alive(queue: JobQueue) -> None:
    """A job is refused at once when no device worker is left to run it (the probes say so too)."""
    if not queue.alive:
        raise DeviceUnavailable("the device thread has stopped; the service must be restarted")


def refuse_when_full(bounds: QueueBounds, waiting: int, owners_waiting: int, retry_after: int) -> None:
    """A job is refused (429) when the queue holds `max_queue` jobs, or its owner (API key)
    `max_queued_per_owner`: both stores decide by this rule (the shared one in submit.lua)."""
    if waiting >= bounds.max_queue:
        raise QueueFull(
            f"the queue is full ({bounds.max_queue} jobs waiting: SDXL_MAX_QUEUE); retry later", retry_after
        )
    if bounds.max_queued_per_owner and owners_waiting >= bounds.max_queued_per_owner:
        raise QueueFull(
            f"this API key has {owners_waiting} jobs waiting, as many as one key may (SDXL_MAX_QUEUED_PER_KEY); "
            "retry later",
            retry_after,
        )


def retry_after_s(workers: Sequence[DeviceWorker]) -> int:
    """Seconds until a full queue has room again: the time one job takes (from this process's
    recent ones), shared by the devices that run."""
    durations = [duration for worker in workers for duration in worker.recent_durations]
    running = sum(1 for worker in workers if worker.alive) or 1
    return max(1, round((sum(durations) / len(durations) if durations else 5.0) / running))
