"""Waiting for jobs, the same way for both queues. A request waiting on a job waits on an
`asyncio.Event` of its own loop, set (from any thread) when a change to its job is noticed: the
memory queue notices its own changes, the shared queue hears them on Redis's channel
(redis_queue/feed.py). Nobody reads a job in a loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from backends.sdxl_backend.errors import StoreUnavailable, TimedOut
from backends.sdxl_backend.jobs.contract import refuse_unless_alive
from backends.sdxl_backend.jobs.job import Job, JobResult

if TYPE_CHECKING:
    from backends.sdxl_backend.jobs.contract import JobQueue

logger = logging.getLogger(__name__)


class Watchers:
    def __init__(self) -> None:
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def watch(self, job_id: str, finals_only: bool = False) -> Iterator[asyncio.Event]:
        """An event set whenever the job changes (when it ends only, with `finals_only`), while
        the block runs (on an event loop)."""
        waiter = (asyncio.get_running_loop(), asyncio.Event(), finals_only)
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            yield waiter[1]
        finally:
            with self._lock:
                self._waiters[job_id].discard(waiter)
                if not self._waiters[job_id]:
                    del self._waiters[job_id]

    def wake(self, job_id: str, final: bool) -> None:
        if job_id not in self._waiters:  # (the usual case, looked at without the lock)
            return
        with self._lock:
            waiters = [
                (loop, event) for loop, event, finals_only in self._waiters.get(job_id, ()) if final or not finals_only
            ]
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # (its loop closed: nobody waits any more)
                loop.call_soon_threadsafe(event.set)


async def follow(
    watchers: Watchers,
    job: Job,
    read: Callable[[Job], Awaitable[Job]],
    timeout_s: float,
    done: Callable[[Job], bool],
    finals_only: bool = False,
    fallback_s: float = 3600,
) -> Job:
    """Reads the job whenever a change to it is noticed (its end only, with `finals_only`), until
    `done` says so or `timeout_s` has passed; at least every `fallback_s` (for a notice that may
    have been lost on its way)."""
    deadline = time.monotonic() + timeout_s
    with watchers.watch(job.id, finals_only) as noticed:
        job = await read(job)  # (after the watch began: nothing missed)
        while not done(job) and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(noticed.wait(), min(left, fallback_s))
            except TimeoutError:
                if left <= fallback_s:  # the time is up, and nothing changed since the last read
                    return job
            noticed.clear()
            job = await read(job)
    return job


def _cancel_outcome(cancelling: asyncio.Future) -> None:
    error = None if cancelling.cancelled() else cancelling.exception()
    if error is not None and not isinstance(error, StoreUnavailable):
        logger.warning("an abandoned request's job could not be cancelled (%s)", type(error).__name__)


async def result_of(
    queue: JobQueue, submit: Callable[[], Awaitable[Job]], timeout_s: float, off_loop: Callable[..., Awaitable[Any]]
) -> JobResult:
    """The result of a job whose client waits for it (`JobQueue.run`): submitted (refused when
    the device worker is gone), then awaited once; past `timeout_s`, or when the awaiting task is
    cancelled, the job is cancelled, so the device moves on at its next step. `off_loop` runs a
    call of the queue that may wait on its store."""
    refuse_unless_alive(queue)
    job = await submit()
    try:
        job = await queue.wait(job, timeout_s)
        if not job.status.final:
            await off_loop(queue.cancel, job, "cancelled: past its time")
            job = await queue.wait(job, math.inf)
            if job.result is None:
                raise TimedOut(f"the request took longer than {timeout_s:g} s and was cancelled")
    except asyncio.CancelledError:
        # A cancelled task can await nothing more, and a store call would block the event loop:
        # the cancel runs on a worker thread, unawaited. (Redis away: the job runs on.)
        cancelling = asyncio.get_running_loop().run_in_executor(
            None, queue.cancel, job, "cancelled: its request was abandoned"
        )
        cancelling.add_done_callback(_cancel_outcome)
        raise
    if job.error is not None:
        raise job.error.copy()
    result = job.result
    assert result is not None  # (a final job holds its result or its error)
    await off_loop(queue.forget_result, job)  # delivered: the images are the client's now
    return result
