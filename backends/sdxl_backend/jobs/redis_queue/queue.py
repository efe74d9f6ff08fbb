"""`SharedJobQueue`: the job queue of replicas that share one Redis (the package's docstring
tells how it sits there). The API's side reads and changes jobs in Redis from any replica; the
device worker's side (`JobSource`) takes jobs for this replica's device, writes their progress
and ends them; its `Heartbeat` (heartbeat.py) keeps this replica's running jobs its own and
re-queues those of replicas that stopped beating."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from backends.sdxl_backend.errors import BackendError, JobExpired, UnknownJob, redis_failures_as_unavailable
from backends.sdxl_backend.jobs.contract import refuse_when_full, retry_after_s
from backends.sdxl_backend.jobs.job import Job, JobResult, JobStatus, tell
from backends.sdxl_backend.jobs.redis_queue import codec, feed, keys, scripts
from backends.sdxl_backend.jobs.redis_queue.heartbeat import Heartbeat
from backends.sdxl_backend.jobs.turns import QueueBounds
from backends.sdxl_backend.jobs.waiting import follow, result_of
from backends.sdxl_backend.jobs.worker import Device, DeviceWorker, HandedBack

if TYPE_CHECKING:
    import redis

    from backends.sdxl_backend.jobs.job import JobWork

logger = logging.getLogger(__name__)
T = TypeVar("T")
OWNERS_PAGE = 64  # jobs whose owners one round trip reads, when a listing is one owner's


async def _off_loop(call: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(call, *args)


class SharedJobQueue:
    """`JobQueue` for a fleet: the jobs in Redis."""

    def __init__(
        self,
        devices: Sequence[Device],
        client: redis.Redis,
        bounds: QueueBounds = QueueBounds(),
        on_change: Callable[[Job], None] | None = None,
        card: Callable[[], dict] = dict,
    ):
        self.engine = devices[0].engine  # (any device's: they serve the same models) for batch keys
        self.workers = [DeviceWorker(device, self, on_change) for device in devices]
        self._worker_of = {worker.device.name: worker for worker in self.workers}
        self.client = client
        self.bounds = bounds
        self.on_change = on_change
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._scripts = scripts.register(client, bounds.tombstone_ttl_s)
        self._closing = threading.Event()  # no more jobs taken; the running ones are handed back
        # (it publishes `card`, what this replica serves and runs, for replicas())
        self.heartbeat = Heartbeat(client, self.replica, card, lambda attempts: self._script("reclaim", attempts))
        self._changes = feed.ChangeFeed(client)

    # -- what the API calls (any thread but the event loop's: these wait on Redis) --

    def start(self) -> None:
        self.heartbeat.start()  # (it beats once first: a job this replica takes is never an orphan)
        self._changes.start()
        for worker in self.workers:
            worker.start()

    def submit(
        self,
        prepared: JobWork,
        owner: str | None = None,
        preview_every: int | None = None,
        webhook: dict | None = None,
    ) -> Job:
        job = Job(secrets.token_hex(16), prepared, preview_every, owner, webhook=webhook)
        fields = codec.submitted(job, prepared, self.engine.batch_key(prepared))
        bounds = [self.bounds.max_queue, self.bounds.max_queued_per_owner, owner or "", job.id]
        with redis_failures_as_unavailable():
            placed = self._script("submit", *bounds, *(v for pair in fields.items() for v in pair))
        if not placed[0]:
            refuse_when_full(self.bounds, placed[1], placed[2], self.retry_after_s())
        job.prepared = None  # in Redis now; this copy is the caller's snapshot
        tell(self.on_change, job)
        return job

    async def run(self, prepared: JobWork, owner: str | None, timeout_s: float) -> JobResult:
        return await result_of(self, lambda: _off_loop(self.submit, prepared, owner), timeout_s, _off_loop)

    def get(self, job_id: str, owner: str | None = None) -> Job:
        with redis_failures_as_unavailable():
            job = self._load([job_id])[0]
            if job is not None and (owner is None or job.owner == owner):
                return job
            if job is None and self.client.exists(keys.gone(job_id)):
                raise JobExpired(f"job {job_id} has expired and was deleted", "job_id")
        raise UnknownJob(f"no job {job_id}", "job_id")

    def refresh(self, job: Job) -> Job:
        return self.get(job.id)

    async def wait(self, job: Job, timeout_s: float) -> Job:
        return await follow(
            self._changes.watchers,
            job,
            self._read,
            timeout_s,
            lambda job: job.status.final,
            finals_only=True,
            fallback_s=feed.FALLBACK_S,
        )

    async def changed(self, job: Job, version: int, timeout_s: float) -> Job:
        return await follow(
            self._changes.watchers,
            job,
            self._read,
            timeout_s,
            lambda job: job.version != version or job.status.final,
            fallback_s=feed.FALLBACK_S,
        )

    def recent(
        self, limit: int = 50, before: float | None = None, owner: str | None = None, images: bool = True
    ) -> list[Job]:
        with redis_failures_as_unavailable():
            start, num = (0, limit) if owner is None else (None, None)  # (an owner's are picked from all, below)
            newest_first = self.client.zrevrangebyscore(
                keys.INDEX, f"({before}" if before is not None else "+inf", "-inf", start=start, num=num
            )
            ids = [codec.decoded(i) for i in newest_first]
            if owner is not None:
                ids = self._owned_by(owner, ids, limit)
            return [job for job in self._load(ids[:limit], images) if job is not None]

    def _owned_by(self, owner: str, ids: list[str], limit: int) -> list[str]:
        """The first `limit` of `ids` that `owner` made. Their owners are read a page at a time,
        so that finding a caller's latest job (an idle A1111 /progress poll) reads a few, not all."""
        mine: list[str] = []
        for first in range(0, len(ids), OWNERS_PAGE):
            page = ids[first : first + OWNERS_PAGE]
            pipe = self.client.pipeline(transaction=False)
            for job_id in page:
                pipe.hget(keys.job(job_id), "owner")
            mine += [job_id for job_id, own in zip(page, pipe.execute()) if own == owner.encode()]
            if len(mine) >= limit:
                break
        return mine[:limit]

    def position(self, job: Job) -> int:
        """Across the replicas."""
        if job.status != JobStatus.QUEUED:
            return 0
        with redis_failures_as_unavailable():
            return self._script("position", job.id, self.bounds.order)

    def retry_after_s(self) -> int:
        return retry_after_s(self.workers)

    @property
    def queue_length(self) -> int:
        with redis_failures_as_unavailable():
            return self.client.llen(keys.QUEUE)

    @property
    def running(self) -> list[Job]:
        with redis_failures_as_unavailable():
            ids = [codec.decoded(i) for i in self.client.hkeys(keys.RUNNING)]
            return sorted((job for job in self._load(ids) if job is not None), key=lambda job: job.created)

    @property
    def running_here(self) -> list[Job]:
        return [job for worker in self.workers for job in worker.running]

    @property
    def alive(self) -> bool:
        """Whether a device thread of this replica (and the heartbeat that keeps its jobs its own) runs."""
        return any(worker.alive for worker in self.workers) and self.heartbeat.alive

    def cancel(self, job: Job, reason: str = "cancel requested") -> None:
        """On whichever replica runs it."""
        self._cancel(job, "cancel", reason)

    def stop_early(self, job: Job, reason: str) -> None:
        self._cancel(job, "stop", reason)

    def forget_result(self, job: Job) -> None:
        with redis_failures_as_unavailable():
            self._script("forget_result", job.id)

    def replicas(self) -> list[dict]:
        with redis_failures_as_unavailable():
            return self.heartbeat.cards()

    def hold_webhook(self, job_id: str, event: str, message_id: str) -> None:
        hold = json.dumps({"replica": self.replica, "message_id": message_id})
        with redis_failures_as_unavailable():
            self.client.hset(keys.WEBHOOKS, f"{job_id} {event}", hold)

    def record_webhook(self, job_id: str, event: str, outcome: dict) -> None:
        with redis_failures_as_unavailable():
            self._script("record_webhook", job_id, f"webhook:{event}", json.dumps(outcome))

    def orphaned_webhooks(self) -> list[tuple[Job, str, str]]:
        with redis_failures_as_unavailable():
            claimed = [part.decode() for part in self._script("claim_webhooks", self.replica)]
        held = list(zip(claimed[::3], claimed[1::3], claimed[2::3]))
        jobs = self._load([job_id for job_id, _, _ in held])
        return [(job, event, message_id) for job, (_, event, message_id) in zip(jobs, held) if job is not None]

    def close(self) -> None:
        """Stop taking jobs and hand the running ones back at their next step (another replica
        resumes them); queued jobs stay queued for the fleet."""
        self._closing.set()
        for worker in self.workers:
            if worker.device.thread.ident is not None:
                worker.device.thread.join(timeout=30)
        # (It beat on until now: the job being handed back stayed this replica's.)
        self.heartbeat.stop(*(self._wake_key(worker.device) for worker in self.workers))
        self._changes.close()

    # -- what the device worker calls (`JobSource`), on the device thread --

    def wake(self, device: Device) -> None:
        """Ends the device thread's wait for jobs (see `take`), so that it runs a call now."""
        wake_key = self._wake_key(device)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(wake_key, "1")
            pipe.expire(wake_key, 60)
            pipe.execute()
        except Exception:  # Redis away: the device thread is not waiting on it either
            pass

    def take(self, device: Device) -> list[Job] | None:
        if self._closing.is_set():
            return None
        try:
            ids = self._script(
                "take", self.replica, self.bounds.max_batch, self.bounds.lookahead, self.bounds.order, device.name
            )
            self.heartbeat.answered()
            if not ids:
                # A submit anywhere, work handed to this device, or a second, whichever first.
                self.client.blpop([keys.WAKE, self._wake_key(device)], timeout=1)
                return []
            return self._started([i.decode() for i in ids], device)
        except Exception as exc:
            if not self.heartbeat.failed(exc):
                logger.exception("the device thread caught an error taking jobs; it goes on")
            self._closing.wait(1)
            return []

    def before_step(self, job: Job) -> None:
        """Reads the job's cancel and interrupt flags (set from any replica); hands the job back
        when this replica is stopping, or lets it go when another replica has taken it over."""
        if self._closing.is_set():
            self._hand_back(job)
            raise HandedBack(f"job {job.id} handed back: its replica is stopping")
        try:
            cancel_at, stop_at, replica = self.client.hmget(
                keys.job(job.id), "cancel_requested_at", "stop_requested_at", "replica"
            )
        except Exception as exc:  # Redis away: the job goes on, its flags unread
            self.heartbeat.failed(exc)
            return
        job.cancel_requested_at, job.stop_requested_at = codec.number(cancel_at), codec.number(stop_at)
        if replica != self.replica.encode():  # re-queued while this replica could not beat (Redis away)
            raise HandedBack(f"job {job.id} was taken over by another replica")

    def after_step(self, job: Job) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(keys.job(job.id), mapping=codec.progress(job))
            pipe.hincrby(keys.job(job.id), "version", 1)
            pipe.publish(keys.CHANGES, job.id)
            pipe.execute()
        except Exception as exc:
            self.heartbeat.failed(exc)

    def finish(self, job: Job, status: JobStatus, result: JobResult | None, error: BackendError | None) -> None:
        job.settle(status, result, error)
        fields = codec.finished(job)
        arguments = [job.id, self.replica, job.held_bytes, *(v for pair in fields.items() for v in pair)]
        if self._until_reachable(lambda: self._script("finish", *arguments)) == 0:
            logger.warning("a job finished here after another replica took it over; this result is dropped")

    def _started(self, ids: list[str], device: Device) -> list[Job]:
        """The jobs taken, decoded; one that cannot run here (a model this replica does not
        serve) fails at once."""

        def read() -> list[dict[bytes, bytes]]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            return pipe.execute()

        batch = []
        for job_id, fields in zip(ids, self._until_reachable(read) or []):
            if not fields:  # (Redis lost it: nothing to run)
                continue
            job = codec.taken(job_id, fields, device.engine)
            job.started, job.device = time.time(), device.name
            if job.prepared is None:
                self._worker_of[device.name].finish(job, JobStatus.FAILED, error=job.error)
            else:
                batch.append(job)
        return batch

    def _hand_back(self, job: Job) -> None:
        try:
            if self._script("hand_back", job.id, self.replica):
                logger.info("a running job was handed back to the queue: this replica is stopping")
        except Exception as exc:  # Redis away: the job is re-queued when this replica's heartbeat lapses
            self.heartbeat.failed(exc)

    # -- helpers --

    async def _read(self, job: Job) -> Job:
        return await _off_loop(self.refresh, job)

    def _wake_key(self, device: Device) -> str:
        return keys.wake_for(f"{self.replica}/{device.name}")

    def _script(self, name: str, *arguments: Any) -> Any:
        bounds = [time.time(), self.bounds.ttl_s, self.bounds.max_jobs, self.bounds.max_bytes]
        return self._scripts[name](keys=[keys.PREFIX], args=[*bounds, *arguments])

    def _until_reachable(self, call: Callable[[], T]) -> T | None:
        """`call()`, tried again every second while Redis is out of reach: a job taken must reach
        Redis again (the device could take no other anyway). None when this replica stops first
        (its heartbeat then lapses, and another replica takes its jobs over)."""
        while True:
            try:
                outcome = call()
                self.heartbeat.answered()
                return outcome
            except Exception as exc:
                if not self.heartbeat.failed(exc):
                    raise
                if self._closing.wait(1):
                    return None

    def _cancel(self, job: Job, kind: str, reason: str) -> None:
        with redis_failures_as_unavailable():
            before = self._script("cancel", job.id, kind, f"job {job.id} cancelled before it started")
        if before is not None:
            logger.info("job %s while %s", reason, before.decode())
            if before == b"queued":
                tell(self.on_change, self.refresh(job))

    def _load(self, ids: list[str], images: bool = True) -> list[Job | None]:
        """Snapshots of the jobs (None for one that is not there), a finished result's images
        included unless not wanted (then `result` is None: a few bytes a job instead of megabytes)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job(job_id), codec.SNAPSHOT_FIELDS)
        records = [dict(zip(codec.SNAPSHOT_FIELDS, values)) for values in pipe.execute()]
        counts = [_image_count(record) if record["status"] and images else 0 for record in records]
        for job_id, count in zip(ids, counts):
            if count:
                pipe.hmget(keys.job(job_id), [f"image:{index}" for index in range(count)])
        image_sets = iter(pipe.execute())
        return [
            _snapshot(job_id, record, next(image_sets) if count else []) if record["status"] else None
            for job_id, record, count in zip(ids, records, counts)
        ]


def _image_count(record: dict) -> int:
    try:
        return max(0, int(record["images"] or 0))
    except ValueError:
        return 0  # (the record is read, or refused, by _snapshot)


def _snapshot(job_id: str, record: dict, images: list) -> Job | None:
    """The job a record holds; a record that cannot be read (a field broken by hand or by a
    bug) is that job's loss alone: logged and left out, never an error for every listing."""
    try:
        return codec.snapshot(job_id, record, images)
    except Exception as exc:
        # (its type alone: a record's fields may hold a prompt, and its id is not for the log)
        logger.error("a job record in Redis could not be read (%s); it is left out", type(exc).__name__)
        return None
