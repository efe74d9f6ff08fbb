"""`MemoryJobQueue`: the job queue of one process, in memory (with a journal of small files so
that a restarted worker still answers for the ids it handed out). Replicas that share a Redis
share `SharedJobQueue` instead.

A device worker takes the job whose turn it is (turns.py: owners take turns), and with it the
jobs near their turn that can share its pipeline call (`Engine.batch_key`), up to `max_batch`
images. Jobs are the objects the device thread keeps current: readers see them change. Finished
jobs drop their input and are kept for a while (their images counted against a byte budget),
then forgotten; an id forgotten that way is remembered as expired for `tombstone_ttl_s`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import InvalidStateError
from typing import TYPE_CHECKING, Any

from backends.sdxl_backend.errors import BackendError, Cancelled, JobExpired, UnknownJob
from backends.sdxl_backend.jobs.contract import refuse_when_full, retry_after_s
from backends.sdxl_backend.jobs.job import Job, JobResult, JobStatus, tell
from backends.sdxl_backend.jobs.journal import JobJournal
from backends.sdxl_backend.jobs.turns import QueueBounds, first_batch, slot, turn_order
from backends.sdxl_backend.jobs.waiting import Watchers, follow, result_of
from backends.sdxl_backend.jobs.worker import Device, DeviceWorker

if TYPE_CHECKING:
    from backends.sdxl_backend.generation.engine import Engine
    from backends.sdxl_backend.jobs.job import JobWork

logger = logging.getLogger(__name__)
MAX_TOMBSTONES = 100_000  # forgotten ids remembered as expired, at most (each costs a few dozen bytes)


async def _as_is(job: Job) -> Job:
    return job  # (the device thread keeps it current)


async def _inline(call: Callable[..., Any], *args: Any) -> Any:
    return call(*args)  # (memory: nothing to wait for)


class MemoryJobQueue:
    """The bounded queue in front of this process's device (`JobQueue`)."""

    def __init__(
        self,
        devices: Sequence[Device],
        bounds: QueueBounds = QueueBounds(),
        on_change: Callable[[Job], None] | None = None,
        journal: JobJournal | None = None,
    ):
        self.engine = devices[0].engine  # (any device's: they serve the same models) for batch keys
        self.bounds = bounds
        self.workers = [DeviceWorker(device, self, on_change) for device in devices]
        self.journal = journal
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        # Told of every submit, start, step and finish (metrics, webhooks), on the thread that did it.
        self.on_change = on_change
        self._jobs: dict[str, Job] = {}  # every job held
        self._queue: list[Job] = []  # waiting, in arrival order (turns.py orders them)
        self._last_turn: dict[str, int] = {}  # slot (owner, priority) -> the turn its last job was taken at
        self._turns = 0
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in the order they finished
        self._finished_bytes = 0
        self._expired: OrderedDict[str, float] = OrderedDict()  # forgotten ids -> when, oldest first
        self._closing = False
        self._lock = threading.Condition()
        self._watchers = Watchers()
        for job in journal.recover() if journal else []:
            self._jobs[job.id] = self._finished[job.id] = job
        if self._finished:
            logger.warning(
                "%d job(s) of a previous worker found; those unfinished are marked failed", len(self._finished)
            )

    # -- what the API calls --

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def submit(
        self,
        prepared: JobWork,
        owner: str | None = None,
        preview_every: int | None = None,
        webhook: dict | None = None,
        waited_on: bool = False,
    ) -> Job:
        with self._lock:
            refuse_when_full(
                self.bounds,
                len(self._queue),
                sum(1 for job in self._queue if job.owner == owner),
                self.retry_after_s(),
            )
            job = Job(secrets.token_hex(16), prepared, preview_every, owner, waited_on=waited_on, webhook=webhook)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._journal(job)
            self._lock.notify_all()
        tell(self.on_change, job)
        return job

    async def run(self, prepared: JobWork, owner: str | None, timeout_s: float) -> JobResult:
        return await result_of(
            self, lambda: _inline(self.submit, prepared, owner, None, None, True), timeout_s, _inline
        )

    def get(self, job_id: str, owner: str | None = None) -> Job:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
            if job is not None and (owner is None or job.owner == owner):
                return job
            if job is None and job_id in self._expired:  # (`_expire` just dropped those past their time)
                raise JobExpired(f"job {job_id} has expired and was deleted", "job_id")
            raise UnknownJob(f"no job {job_id}", "job_id")

    def refresh(self, job: Job) -> Job:
        return job  # the object itself, which the device thread keeps current

    async def wait(self, job: Job, timeout_s: float) -> Job:
        return await follow(self._watchers, job, _as_is, timeout_s, lambda job: job.status.final, finals_only=True)

    async def changed(self, job: Job, version: int, timeout_s: float) -> Job:
        return await follow(
            self._watchers, job, _as_is, timeout_s, lambda job: job.version != version or job.status.final
        )

    def recent(
        self, limit: int = 50, before: float | None = None, owner: str | None = None, images: bool = True
    ) -> list[Job]:  # (the jobs themselves: their images cost nothing to hand over)
        with self._lock:
            self._expire()
            jobs = sorted(self._jobs.values(), key=lambda job: job.created, reverse=True)
        return [
            job for job in jobs if (before is None or job.created < before) and (owner is None or job.owner == owner)
        ][:limit]

    def position(self, job: Job) -> int:
        with self._lock:
            try:
                return self._in_turn().index(job) + 1
            except ValueError:
                return 0

    def retry_after_s(self) -> int:
        return retry_after_s(self.workers)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[Job]:
        return sorted((job for worker in self.workers for job in worker.running), key=lambda job: job.created)

    @property
    def running_here(self) -> list[Job]:
        return self.running

    @property
    def alive(self) -> bool:
        return any(worker.alive for worker in self.workers)

    def cancel(self, job: Job, reason: str = "cancel requested") -> None:
        with self._lock:
            if job.status.final or job.cancel_requested_at is not None:
                return
            job.cancel_requested_at = time.time()
            logger.info("job %s while %s", reason, job.status)
            if job.status == JobStatus.QUEUED:
                self._queue.remove(job)
                self.finish(job, JobStatus.CANCELLED, None, Cancelled(f"job {job.id} cancelled before it started"))
            else:
                self._changed(job)
        if job.status.final:
            tell(self.on_change, job)

    def stop_early(self, job: Job, reason: str) -> None:
        with self._lock:
            if job.status == JobStatus.QUEUED:
                self.cancel(job, reason)
            elif job.status == JobStatus.RUNNING and job.stop_requested_at is None:
                job.stop_requested_at = time.time()
                logger.info("job %s at step %d of %d", reason, job.step, job.total_steps)
                self._changed(job)

    def forget_result(self, job: Job) -> None:
        with self._lock:
            if job.result is not None and job.id in self._finished:
                self._finished_bytes -= job.held_bytes
                job.result, job.preview = None, None
                self._finished_bytes += job.held_bytes

    def replicas(self) -> list[dict]:
        return []

    def hold_webhook(self, job_id: str, event: str, message_id: str) -> None:
        """(One process: no other replica could deliver what it held.)"""

    def orphaned_webhooks(self) -> list[tuple[Job, str, str]]:
        return []

    def record_webhook(self, job_id: str, event: str, outcome: dict) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.webhooks[event] = outcome
                self._changed(job)

    def close(self) -> None:
        """Cancel what waits, let the running jobs stop at their next step, end the device thread."""
        with self._lock:
            self._closing = True
            for job in [*self._queue, *self.running]:
                self.cancel(job, "cancelled: the server is shutting down")
            self._lock.notify_all()
        for worker in self.workers:
            if worker.device.thread.ident is not None:
                worker.device.thread.join(timeout=30)

    # -- what the device worker calls (`JobSource`) --

    def wake(self, device: Device) -> None:
        with self._lock:
            self._lock.notify_all()

    def take(self, device: Device) -> list[Job] | None:
        with self._lock:
            while not self._queue and not self._closing and not device.thread.pending:
                self._lock.wait()
            if self._closing:
                return None
            if not self._queue:  # (woken for a call)
                return []
            batch = self._take_batch(device.engine)
            for job in batch:
                job.status, job.started, job.device = JobStatus.RUNNING, time.time(), device.name
                self._changed(job)
                self._journal(job)
        return batch

    def before_step(self, job: Job) -> None:
        pass  # (the job's flags are on the job itself)

    def after_step(self, job: Job) -> None:
        self._watchers.wake(job.id, False)

    def finish(self, job: Job, status: JobStatus, result: JobResult | None, error: BackendError | None) -> None:
        with self._lock:
            job.settle(status, result, error)
            self._finished[job.id] = job
            self._finished_bytes += job.held_bytes
            self._journal(job)
            self._expire()
        self._watchers.wake(job.id, True)
        with contextlib.suppress(InvalidStateError):  # its waiter cancelled the future: nobody is left to tell
            job.done.set_result(None)

    # -- helpers --

    def _changed(self, job: Job) -> None:
        job.version += 1
        self._watchers.wake(job.id, False)

    def _journal(self, job: Job) -> None:
        if self.journal and not job.waited_on:
            self.journal.write(job)

    def _in_turn(self) -> list[Job]:
        """The waiting jobs in the order they will be taken (turns.py). Called with the lock held."""
        return turn_order(self._queue, lambda job: slot(job.owner, job.priority), self._last_turn, self.bounds.order)

    def _take_batch(self, engine: Engine) -> list[Job]:
        """The job whose turn it is, and the jobs near their turn that can share its call, in
        turn order, while their images fit in `max_batch`. Called with the lock held."""
        batch = first_batch(
            self._in_turn(), lambda job: engine.batch_key(job.to_run), lambda job: job.to_run.image_count, self.bounds
        )
        for job in batch:
            self._queue.remove(job)
            self._turns += 1
            self._last_turn[slot(job.owner, job.priority)] = self._turns
        return batch

    def _expire(self) -> None:
        """Forget finished jobs past their time, beyond the count, or beyond the bytes: the
        oldest first, looking at no more jobs than it forgets. Called with the lock held."""
        now = time.time()
        while self._finished:
            job = next(iter(self._finished.values()))
            if (
                now - (job.finished or now) <= self.bounds.ttl_s  # (set: it is finished)
                and len(self._finished) <= self.bounds.max_jobs
                and self._finished_bytes <= self.bounds.max_bytes
            ):
                break
            del self._finished[job.id], self._jobs[job.id]
            self._finished_bytes -= job.held_bytes
            self._expired[job.id] = now
            if self.journal:
                self.journal.forget(job.id)
        while self._expired and (
            len(self._expired) > MAX_TOMBSTONES
            or now - next(iter(self._expired.values())) > self.bounds.tombstone_ttl_s
        ):
            self._expired.popitem(last=False)
