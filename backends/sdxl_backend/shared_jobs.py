"""The job queue of a fleet: replicas that share one Redis (`SDXL_REDIS_URL`) share one queue.

Every generation, a synchronous one too, is a job in Redis: any replica answers for any job
(status, queue position, progress, previews, events, cancel, result), and each replica's device
thread takes the next jobs only when its device is free, so work goes to idle GPUs in arrival
order across the fleet. It has `JobQueue`'s interface; `Job`s it hands out are snapshots, read
again with `refresh`.

How it sits in Redis (one Redis, or a primary with replicas; not a Redis Cluster, whose scripts
may only touch keys they declare):

- `sdxl:jobs:queue`, a list of waiting job ids, oldest first; `sdxl:jobs:job:<id>`, a hash per
  job (its prepared request with the input images as PNG, its state, then its result);
  `sdxl:jobs:running`, running job id -> the replica running it; `sdxl:jobs:replica:<name>`,
  each replica's heartbeat, which expires when it stops beating. A device thread with nothing
  to do waits on `sdxl:jobs:wake` (pushed by every submit) and `sdxl:jobs:wake:<name>` (work
  handed to that replica's device thread, such as an unload), a second at most.
- Every change is one Lua script, so no two replicas ever take the same job or half-change one.
  TAKE pops the oldest job and the queued jobs that can share its pipeline call (the same
  `Engine.batch_key`, computed when it was submitted) while their images fit `max_batch`.
- A replica whose heartbeat lapsed (killed, its node gone) leaves its running jobs to RECLAIM,
  which any replica runs every few seconds: each goes back to the head of the queue, or, after
  `MAX_ATTEMPTS` runs, fails with an error that says so. A replica that is stopped hands its
  running job back at the next step. Queued jobs belong to the fleet and outlive every replica.
- Cancel and interrupt are flags in the job's hash; the running replica reads them between two
  denoising steps, so a cancel sent to any replica stops the job at its next step.
- Every change of a job (taken, a step, a flag, finished, re-queued) is published on the channel
  `sdxl:jobs:changed` as the job's id (`<id> final` when it ends). Each replica holds one
  subscription (`ChangeFeed`) and wakes the requests waiting on that job, which then read it: an
  event stream follows each step, a synchronous request reads its job once more when it ends,
  wherever it runs, and none reads in a loop. A notice lost while Redis reconnects costs a waiter
  at most `FALLBACK_S`: it reads its job that often anyway.
- Finished jobs are indexed by finishing time and evicted by age (`ttl_s`), count (`max_jobs`)
  and the bytes their images hold (`max_bytes`), the bounds of `JobQueue`; an evicted id leaves a
  tombstone for a day (expired, 410, rather than unknown, 404).

Why a list and scripts rather than a stream and a consumer group: a consumer group delivers
entries strictly in order, one at a time, so the compatible jobs further back that one pipeline
call can take with the oldest (cross-request batching) cannot be picked; the reliable-queue
pattern on a list (a running set beside the queue, heartbeats, reclaim) can, and the queue's
length is what KEDA's Redis scaler reads to add replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator

import anyio
from PIL import Image

from . import errors
from .device_thread import DeviceThread
from .errors import BackendError, Cancelled, JobExpired, QueueFull, UnknownJob, redis_failures_as_unavailable
from .jobs import Job, JobStatus, run_batch, tell
from .protocol import MAX_CONTROLNETS, GeneratedImage, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    import redis
    import torch

    from .engine import Engine, PreparedRequest

logger = logging.getLogger("sdxl_backend")

PREFIX = "sdxl:jobs:"
HEARTBEAT_S = 2.0  # each replica says it is alive this often...
HEARTBEAT_TTL_S = 10  # ...and is taken for dead, its running jobs re-queued, this long after it stops
MAX_ATTEMPTS = 3  # runs of a job cut short by its replica dying, before it fails
CHANGES = PREFIX + "changed"  # the channel each job change is published on, as the job's id
FALLBACK_S = 1.0  # a waiter reads its job at least this often, in case a change notice was lost
TOMBSTONE_TTL_S = 86400
INPUTS = ["init_image", "mask", *(f"control:{index}" for index in range(MAX_CONTROLNETS))]

# Shared by every script. KEYS[1]: the key prefix. ARGV[1..4]: now, the finished jobs' time to
# live, their greatest count and bytes; ARGV[5...]: the script's own.
PRELUDE = """
local prefix = KEYS[1]
local queue, running, finished, index, total = prefix .. 'queue', prefix .. 'running', prefix .. 'finished',
  prefix .. 'index', prefix .. 'bytes'
local now, ttl, max_jobs, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local INPUTS = {%s}
local function job_key(id) return prefix .. 'job:' .. id end
local function changed(id, final) redis.call('PUBLISH', prefix .. 'changed', final and (id .. ' final') or id) end
local function finalize(id, status, held)
  local job = job_key(id)
  redis.call('HDEL', job, unpack(INPUTS))
  redis.call('HSET', job, 'status', status, 'finished', ARGV[1], 'held', held)
  redis.call('HINCRBY', job, 'version', 1)
  redis.call('HDEL', running, id)
  redis.call('ZADD', finished, now, id)
  redis.call('INCRBY', total, held)
  changed(id, true)
end
local function fail(id, status, error_type, message)
  redis.call('HSET', job_key(id), 'error_type', error_type, 'error_message', message, 'error_param', '')
  redis.call('HDEL', job_key(id), 'preview')
  finalize(id, status, 0)
end
local function evict()
  while true do
    local oldest = redis.call('ZRANGE', finished, 0, 0, 'WITHSCORES')
    if #oldest == 0 then return end
    local id, at = oldest[1], tonumber(oldest[2])
    if now - at <= ttl and redis.call('ZCARD', finished) <= max_jobs
        and tonumber(redis.call('GET', total) or '0') <= max_bytes then
      return
    end
    redis.call('DECRBY', total, tonumber(redis.call('HGET', job_key(id), 'held') or '0'))
    redis.call('DEL', job_key(id))
    redis.call('ZREM', finished, id)
    redis.call('ZREM', index, id)
    redis.call('SET', prefix .. 'gone:' .. id, '1', 'EX', %d)
  end
end
""" % (", ".join(f"'{name}'" for name in INPUTS), TOMBSTONE_TTL_S)

# ARGV[5]: the queue's bound, [6]: the id, [7...]: the job's fields. 0 when the queue is full,
# else the job's position.
SUBMIT = PRELUDE + """
if redis.call('LLEN', queue) >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', job_key(ARGV[6]), unpack(ARGV, 7))
redis.call('ZADD', index, now, ARGV[6])
redis.call('RPUSH', prefix .. 'wake', '1')
redis.call('LTRIM', prefix .. 'wake', -64, -1)
return redis.call('RPUSH', queue, ARGV[6])
"""

# ARGV[5]: the replica, [6]: images per pipeline call, [7]: how far down the queue to look for
# jobs to batch with the oldest. The ids taken, oldest first.
TAKE = PRELUDE + """
local head = redis.call('LPOP', queue)
while head and redis.call('EXISTS', job_key(head)) == 0 do head = redis.call('LPOP', queue) end  -- (deleted by hand)
if not head then return {} end
local taken = {head}
local fields = redis.call('HMGET', job_key(head), 'n', 'batch_key')
local images, key, max_batch = tonumber(fields[1] or '1'), fields[2], tonumber(ARGV[6])
if key and key ~= '' and images < max_batch then
  for _, id in ipairs(redis.call('LRANGE', queue, 0, tonumber(ARGV[7]) - 1)) do
    local other = redis.call('HMGET', job_key(id), 'n', 'batch_key')
    local n = tonumber(other[1] or '0')
    if other[2] == key and images + n <= max_batch then
      redis.call('LREM', queue, 1, id)
      table.insert(taken, id)
      images = images + n
      if images == max_batch then break end
    end
  end
end
for _, id in ipairs(taken) do
  redis.call('HSET', job_key(id), 'status', 'running', 'started', ARGV[1], 'replica', ARGV[5])
  redis.call('HINCRBY', job_key(id), 'attempts', 1)
  redis.call('HINCRBY', job_key(id), 'version', 1)
  redis.call('HSET', running, id, ARGV[5])
  changed(id)
end
return taken
"""

# Puts a running job back at the head of the queue, as it was before it started.
REQUEUE = """
local function requeue(id)
  redis.call('HDEL', running, id)
  redis.call('HSET', job_key(id), 'status', 'queued', 'replica', '', 'started', '', 'step', 0, 'first_step_at', '',
             'preview_step', 0, 'stop_requested_at', '')
  redis.call('HDEL', job_key(id), 'preview')
  redis.call('HINCRBY', job_key(id), 'version', 1)
  redis.call('LPUSH', queue, id)
  changed(id)
end
"""

# ARGV[5]: runs allowed. Re-queues (or fails) the running jobs of replicas whose heartbeat has
# lapsed, the oldest nearest the head; evicts. {re-queued, failed}.
RECLAIM = PRELUDE + REQUEUE + """
local orphans, created = {}, {}
local entries = redis.call('HGETALL', running)
for i = 1, #entries, 2 do
  if redis.call('EXISTS', prefix .. 'replica:' .. entries[i + 1]) == 0 then
    table.insert(orphans, entries[i])
    created[entries[i]] = tonumber(redis.call('HGET', job_key(entries[i]), 'created') or '0')
  end
end
table.sort(orphans, function(a, b) return created[a] > created[b] end)
local requeued, failed = 0, 0
for _, id in ipairs(orphans) do
  local job = redis.call('HMGET', job_key(id), 'attempts', 'cancel_requested_at')
  if redis.call('EXISTS', job_key(id)) == 0 then
    redis.call('HDEL', running, id)
  elseif job[2] and job[2] ~= '' then
    fail(id, 'cancelled', 'Cancelled', 'job ' .. id .. ' cancelled; its replica stopped before it could stop the job')
  elseif tonumber(job[1] or '0') >= tonumber(ARGV[5]) then
    fail(id, 'failed', 'BackendError', 'failed: the replica running this job stopped (' .. job[1]
         .. ' times); it will not be tried again')
    failed = failed + 1
  else
    requeue(id)
    requeued = requeued + 1
  end
end
evict()
return {requeued, failed}
"""

# ARGV[5]: the id, [6]: the replica handing it back (a stopping one). 1 if it was re-queued.
HAND_BACK = PRELUDE + REQUEUE + """
if redis.call('HGET', running, ARGV[5]) ~= ARGV[6] then return 0 end
redis.call('HINCRBY', job_key(ARGV[5]), 'attempts', -1)
requeue(ARGV[5])
redis.call('RPUSH', prefix .. 'wake', '1')
return 1
"""

# ARGV[5]: the id, [6]: 'cancel' or 'stop' (end the denoising early, keep the image), [7]: the
# message of a queued job cancelled. The job's status before, false when there is no such job.
CANCEL = PRELUDE + """
local job = job_key(ARGV[5])
local status = redis.call('HGET', job, 'status')
if status == 'queued' then
  redis.call('LREM', queue, 1, ARGV[5])
  redis.call('HSET', job, 'cancel_requested_at', ARGV[1])
  fail(ARGV[5], 'cancelled', 'Cancelled', ARGV[7])
  evict()
elseif status == 'running' then
  local flag = ARGV[6] == 'stop' and 'stop_requested_at' or 'cancel_requested_at'
  if (redis.call('HGET', job, flag) or '') == '' then
    redis.call('HSET', job, flag, ARGV[1])
    redis.call('HINCRBY', job, 'version', 1)
    changed(ARGV[5])
  end
end
return status
"""

# ARGV[5]: the id, [6]: the replica, [7]: the bytes it holds, [8...]: its final fields. 0 when the
# replica no longer owns the job (it was re-queued after its heartbeat lapsed).
FINISH = PRELUDE + """
if redis.call('HGET', running, ARGV[5]) ~= ARGV[6] then return 0 end
redis.call('HSET', job_key(ARGV[5]), unpack(ARGV, 8))
finalize(ARGV[5], redis.call('HGET', job_key(ARGV[5]), 'status'), tonumber(ARGV[7]))
evict()
return 1
"""

# ARGV[5]: the id. A delivered result's images go; the record stays.
FORGET_RESULT = PRELUDE + """
local job = job_key(ARGV[5])
if redis.call('ZSCORE', finished, ARGV[5]) == false then return 0 end
local count = tonumber(redis.call('HGET', job, 'images') or '0')
for i = 0, count - 1 do redis.call('HDEL', job, 'image:' .. i) end
redis.call('HDEL', job, 'result', 'preview')
redis.call('DECRBY', total, tonumber(redis.call('HGET', job, 'held') or '0'))
redis.call('HSET', job, 'held', 0, 'images', 0)
return 1
"""

# What a snapshot reads; the input images and the result's images stay behind.
SNAPSHOT_FIELDS = ["status", "owner", "created", "started", "finished", "step", "total_steps", "version",
                   "preview_every", "preview", "preview_step", "first_step_at", "cancel_requested_at",
                   "stop_requested_at", "error_type", "error_message", "error_param", "request", "result", "images"]
ERROR_TYPES = {name: value for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, BackendError)}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless: the replica that runs it sees the same pixels
    return buffer.getvalue()


def request_from_json(data: str | bytes) -> GenerationRequest:
    """A request dumped as JSON, back: the control images are left out of dumps (their maps
    travel beside it), so each unit gets an empty one."""
    fields = json.loads(data)
    for unit in fields.get("controlnets", []):
        unit["image"] = ""
    return GenerationRequest.model_validate(fields)


def encode_prepared(prepared: PreparedRequest) -> dict[str, bytes | str]:
    """A prepared request as hash fields: the request as it will run, its images as PNG."""
    fields: dict[str, bytes | str] = {"request": prepared.request.model_dump_json()}
    if prepared.init_image is not None:
        fields["init_image"] = png(prepared.init_image)
    if prepared.mask is not None:
        fields["mask"] = png(prepared.mask)
    for index, control in enumerate(prepared.controls):
        fields[f"control:{index}"] = png(control)
    return fields


def decode_prepared(fields: dict[bytes, bytes], engine: Engine) -> PreparedRequest:
    """The prepared request again, on the replica that runs it (which must serve its models)."""
    from .engine import PreparedRequest

    def image(name: str) -> Image.Image | None:
        data = fields.get(name.encode())
        return Image.open(io.BytesIO(data)).copy() if data else None

    request = request_from_json(fields[b"request"])
    refiner = engine.models.source(request.refiner.model) if request.refiner else None
    controls = [image(f"control:{index}") for index in range(len(request.controlnets))]
    source = engine.models.source(request.model)
    return PreparedRequest(request, source, image("init_image"), image("mask"), refiner, controls,
                           engine.read_prompts(request, source), engine.read_prompts(request, refiner) if refiner else None)


def _number(value: bytes | None) -> float | None:
    return float(value) if value else None


class SharedJobQueue:
    """`JobQueue` for a fleet: the same methods, the jobs in Redis (see the module's docs)."""

    def __init__(self, engine: Engine, client: redis.Redis, max_queue: int = 64, ttl_s: float = 3600,
                 max_jobs: int = 1000, max_bytes: int = 512 * 2**20, on_change: Callable[[Job], None] | None = None,
                 max_batch: int = 1, device: DeviceThread | None = None):
        self.engine = engine
        self.device = device or DeviceThread()  # runs `_work`, and whatever else needs the device
        self.client = client
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.on_change = on_change
        self.bounds = [ttl_s, max_jobs, max_bytes]
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake_key = f"{PREFIX}wake:{self.replica}"  # this replica's device only
        self._scripts = {name: client.register_script(source) for name, source in (
            ("submit", SUBMIT), ("take", TAKE), ("reclaim", RECLAIM), ("hand_back", HAND_BACK),
            ("cancel", CANCEL), ("finish", FINISH), ("forget_result", FORGET_RESULT))}
        self._running: list[Job] = []  # on this replica's device now
        self._recent_durations: deque[float] = deque(maxlen=20)
        self._closing = threading.Event()  # no more jobs taken; the running ones are handed back
        self._stopped = threading.Event()  # the device thread is done: the heartbeat stops too
        self._reachable = True  # last time the device thread or the heartbeat tried
        self._heart = threading.Thread(target=self._beat, name="sdxl-heartbeat", daemon=True)
        self._changes = ChangeFeed(client)

    # -- what the API calls (any thread but the event loop's: these wait on Redis) --

    def submit(self, prepared: PreparedRequest, preview_every: int | None = None, owner: str | None = None) -> Job:
        job = Job(secrets.token_hex(16), prepared, preview_every, owner)
        key = self.engine.batch_key(prepared)
        fields = {**encode_prepared(prepared), "status": "queued", "owner": owner or "", "created": job.created,
                  "step": 0, "total_steps": job.total_steps, "version": 0, "preview_every": preview_every or "",
                  "n": prepared.request.n, "batch_key": json.dumps(key) if key is not None else "", "attempts": 0}
        with redis_failures_as_unavailable():
            position = self._script("submit", self.max_queue, job.id, *(v for pair in fields.items() for v in pair))
        if not position:
            raise QueueFull(f"the queue is full ({self.max_queue} waiting across the replicas); retry later",
                            self.retry_after_s())
        job.prepared = None  # in Redis now; this copy is the caller's snapshot
        tell(self.on_change, job)
        return job

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, if `owner` may see it: another owner's job is as unknown as a missing one."""
        with redis_failures_as_unavailable():
            job = self._load([job_id])[0]
            if job is not None and (owner is None or job.owner == owner):
                return job
            if job is None and self.client.exists(f"{PREFIX}gone:{job_id}"):
                raise JobExpired(f"job {job_id} has expired and was deleted", "job_id")
        raise UnknownJob(f"no job {job_id}", "job_id")

    def refresh(self, job: Job) -> Job:
        """The job as it stands now."""
        return self.get(job.id)

    async def wait(self, job: Job, timeout_s: float) -> Job:
        """The job once it is final, or as it stands after `timeout_s`."""
        return await self._follow(job, timeout_s, lambda current: current.status.final, finals_only=True)

    async def changed(self, job: Job, version: int, timeout_s: float) -> Job:
        """The job once its version is past `version` (or it is final), or as it stands after
        `timeout_s`."""
        return await self._follow(job, timeout_s, lambda current: current.version != version or current.status.final)

    async def _follow(self, job: Job, timeout_s: float, done: Callable[[Job], bool], finals_only: bool = False) -> Job:
        """Reads the job (it may run on another replica) whenever a change to it is published (its
        end only, with `finals_only`), until `done` says so or `timeout_s` has passed."""
        deadline = time.monotonic() + timeout_s
        with self._changes.watch(job.id, finals_only) as noticed:
            job = await anyio.to_thread.run_sync(self.refresh, job)  # (after the watch began: nothing missed)
            while not done(job) and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(noticed.wait(), min(left, FALLBACK_S))
                except TimeoutError:
                    if left <= FALLBACK_S:  # the time is up, and nothing changed since the last read
                        return job
                noticed.clear()
                job = await anyio.to_thread.run_sync(self.refresh, job)
        return job

    def recent(self, limit: int = 50, before: float | None = None, owner: str | None = None) -> list[Job]:
        """The newest jobs first (of `owner`, when given), at most `limit`, created before `before`."""
        with redis_failures_as_unavailable():
            ids = [i.decode() for i in self.client.zrevrangebyscore(
                f"{PREFIX}index", f"({before}" if before is not None else "+inf", "-inf")]
            if owner is not None:
                pipe = self.client.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hget(f"{PREFIX}job:{job_id}", "owner")
                ids = [job_id for job_id, own in zip(ids, pipe.execute()) if own == owner.encode()]
            return [job for job in self._load(ids[:limit]) if job is not None]

    def position(self, job: Job) -> int:
        """1 for the next job to run (across the replicas), 2 after it...; 0 when not waiting."""
        if job.status != JobStatus.QUEUED:
            return 0
        with redis_failures_as_unavailable():
            index = self.client.lpos(f"{PREFIX}queue", job.id)
        return 0 if index is None else index + 1

    @property
    def queue_length(self) -> int:
        with redis_failures_as_unavailable():
            return self.client.llen(f"{PREFIX}queue")

    @property
    def running(self) -> list[Job]:
        """The jobs running on any replica, oldest first."""
        with redis_failures_as_unavailable():
            ids = [i.decode() for i in self.client.hkeys(f"{PREFIX}running")]
            return sorted((job for job in self._load(ids) if job is not None), key=lambda job: job.created)

    @property
    def running_here(self) -> list[Job]:
        """The jobs on this replica's device."""
        return list(self._running)

    @property
    def alive(self) -> bool:
        """Whether this replica's device thread (and the heartbeat that keeps its jobs its own) runs."""
        return self.device.is_alive() and self._heart.is_alive()

    def retry_after_s(self) -> int:
        mean = sum(self._recent_durations) / len(self._recent_durations) if self._recent_durations else 5.0
        return max(1, round(mean))

    def cancel(self, job: Job, reason: str = "cancel requested") -> None:
        """A queued job never starts; a running one stops at its next step, on whichever replica."""
        self._cancel(job, "cancel", reason)

    def stop_early(self, job: Job, reason: str) -> None:
        """A running job ends its denoising at the next step and succeeds with the image as it
        stands; a queued one is cancelled."""
        self._cancel(job, "stop", reason)

    def forget_result(self, job: Job) -> None:
        """Drop a delivered result's images (synchronous requests): only the record stays."""
        with redis_failures_as_unavailable():
            self._script("forget_result", job.id)

    def start(self) -> None:
        try:
            self._heartbeat()  # before the first take: a job this replica takes is never an orphan
        except Exception as exc:  # Redis away: the device thread waits for it
            self._redis_failure(exc)
        self._changes.start()
        self._heart.start()
        self.device.start(self._work, self._wake)

    def close(self) -> None:
        """Stop taking jobs and hand the running ones back at their next step (another replica
        resumes them); queued jobs stay queued for the fleet."""
        self._closing.set()
        if self.device.ident is not None:
            self.device.join(timeout=30)
        self._stopped.set()  # (it beat on until now: the job being handed back stayed this replica's)
        if self._heart.ident is not None:
            self._heart.join(timeout=30)
        self._changes.close()
        if not self.device.is_alive():  # nothing of ours is left running: others need not wait for the lapse
            try:
                self.client.delete(f"{PREFIX}replica:{self.replica}", self._wake_key)
            except Exception:  # Redis away: the heartbeat lapses by itself
                pass

    # -- the device thread --

    def _wake(self) -> None:
        """Ends the device thread's wait for jobs (see `_work`), so that it runs a call now."""
        try:
            self.client.pipeline(transaction=False).rpush(self._wake_key, "1").expire(self._wake_key, 60).execute()
        except Exception:  # Redis away: the device thread is not waiting on it either
            pass

    def _work(self) -> None:
        while not self._closing.is_set():
            try:
                self.device.run_calls()
                ids = self._script("take", self.replica, self.max_batch, self.max_queue)
                self._redis_is(True)
                if not ids:
                    # A submit anywhere, work handed to this device, or a second, whichever first.
                    self.client.blpop([f"{PREFIX}wake", self._wake_key], timeout=1)
                    continue
                batch = self._start([i.decode() for i in ids])
                if batch:
                    run_batch(self.engine, batch, self._observer, self._finish)
            except Exception as exc:
                if not self._redis_failure(exc):
                    logger.exception("the device thread caught an error around a job; it goes on")
                self._closing.wait(1)

    def _start(self, ids: list[str]) -> list[Job]:
        """The jobs taken, decoded; one that cannot run here (a model this replica does not
        serve) fails at once."""
        def read() -> list[dict[bytes, bytes]]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(f"{PREFIX}job:{job_id}")
            return pipe.execute()

        batch = []
        for job_id, fields in zip(ids, self._until_reachable(read) or []):
            if not fields:  # (Redis lost it: nothing to run)
                continue
            owner = fields.get(b"owner", b"").decode() or None
            try:
                prepared = decode_prepared(fields, self.engine)
            except Exception as exc:  # (a replica of another version, say): the job fails, never stays taken
                job = Job(job_id, None, owner=owner, created=float(fields[b"created"]))
                self._running.append(job)
                self._finish(job, JobStatus.FAILED, error=exc if isinstance(exc, BackendError) else BackendError(
                    f"this replica cannot run the job ({type(exc).__name__}): are the replicas of one version?"))
                continue
            job = Job(job_id, prepared, int(fields.get(b"preview_every") or 0) or None, owner,
                      status=JobStatus.RUNNING, created=float(fields[b"created"]), started=time.time())
            self._running.append(job)
            batch.append(job)
        for job in batch:
            tell(self.on_change, job)
        return batch

    def _observer(self, job: Job) -> Callable:
        """The job's step observer: it reads the job's cancel and interrupt flags from Redis,
        writes its progress there, and hands the job back when this replica is stopping."""
        key = f"{PREFIX}job:{job.id}"

        def on_step(step: int, total: int, latents: torch.Tensor | None) -> bool:
            if self._closing.is_set():
                self._hand_back(job)
                raise Cancelled(f"job {job.id} handed back: its replica is stopping")
            try:
                cancel_at, stop_at, replica = self.client.hmget(key, "cancel_requested_at", "stop_requested_at",
                                                                "replica")
                job.cancel_requested_at, job.stop_requested_at = _number(cancel_at), _number(stop_at)
            except Exception as exc:  # Redis away: the job goes on, its flags unread
                self._redis_failure(exc)
            else:
                if replica != self.replica.encode():  # re-queued while this replica could not beat (Redis away)
                    self._let_go(job)
                    raise Cancelled(f"job {job.id} was taken over by another replica")
            try:
                stop = job.on_step(step, total, latents)
            except Cancelled as exc:
                self._finish(job, JobStatus.CANCELLED, error=exc.copy())  # (`exc` gathers frames on its way up)
                raise
            try:
                progress = {"step": job.step, "total_steps": job.total_steps, "first_step_at": job._first_step_at}
                if job.preview is not None:
                    progress.update(preview=job.preview, preview_step=job.preview_step)
                pipe = self.client.pipeline(transaction=False)
                pipe.hset(key, mapping=progress)
                pipe.hincrby(key, "version", 1)
                pipe.publish(CHANGES, job.id)
                pipe.execute()
            except Exception as exc:
                self._redis_failure(exc)
            return stop
        return on_step

    def _let_go(self, job: Job) -> None:
        """This replica no longer runs the job; the queue has it (or will, once the heartbeat lapses)."""
        self._running.remove(job)
        job.status = JobStatus.QUEUED

    def _hand_back(self, job: Job) -> None:
        self._let_go(job)
        try:
            if self._script("hand_back", job.id, self.replica):
                logger.info("a running job was handed back to the queue: this replica is stopping")
        except Exception as exc:  # Redis away: the job is re-queued when this replica's heartbeat lapses
            self._redis_failure(exc)

    def _finish(self, job: Job, status: JobStatus, result: GenerationResult | None = None,
                error: BackendError | None = None) -> None:
        if error is not None:  # a kept error keeps its message only (see JobQueue._finish)
            error.__traceback__ = error.__context__ = error.__cause__ = None
        job.status, job.result, job.error, job.finished = status, result, error, time.time()
        job.prepared = None
        fields: dict[str, bytes | str | float | int] = {"status": status.value, "step": job.step,
                                                        "total_steps": job.total_steps}
        if result is not None:
            fields["result"] = result.model_dump_json(exclude={"images": {"__all__": {"data"}}})
            fields["images"] = len(result.images)
            fields.update({f"image:{index}": image.data for index, image in enumerate(result.images)})
        if error is not None:
            fields.update(error_type=type(error).__name__, error_message=error.message, error_param=error.param or "")
        if job.preview is not None:
            fields.update(preview=job.preview, preview_step=job.preview_step)
        arguments = [job.id, self.replica, job.held_bytes, *(v for pair in fields.items() for v in pair)]
        if self._until_reachable(lambda: self._script("finish", *arguments)) == 0:
            logger.warning("a job finished here after another replica took it over; this result is dropped")
        if job in self._running:
            self._running.remove(job)
        if job.started is not None:
            self._recent_durations.append(job.finished - job.started)
        if job.cancel_requested_at is not None and status == JobStatus.CANCELLED:
            logger.info("job cancelled: it left the device %.3f s after the request",
                        job.finished - job.cancel_requested_at)
        tell(self.on_change, job)

    # -- the heartbeat thread --

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self._heartbeat()
                requeued, failed = self._script("reclaim", MAX_ATTEMPTS)
                if requeued or failed:
                    logger.warning("%d job(s) of a replica that stopped were re-queued, %d failed after %d attempts",
                                   requeued, failed, MAX_ATTEMPTS)
                self._redis_is(True)
            except Exception as exc:
                if not self._redis_failure(exc):
                    logger.exception("the heartbeat caught an error; it goes on")

    def _heartbeat(self) -> None:
        self.client.set(f"{PREFIX}replica:{self.replica}", time.time(), ex=HEARTBEAT_TTL_S)

    # -- helpers --

    def _script(self, name: str, *arguments):
        bounds = [time.time(), *self.bounds]
        return self._scripts[name](keys=[PREFIX], args=[*bounds, *arguments])

    def _until_reachable(self, call: Callable):
        """`call()`, tried again every second while Redis is out of reach: a job taken must reach
        Redis again (the device could take no other anyway). None when this replica stops first
        (its heartbeat then lapses, and another replica takes its jobs over)."""
        while True:
            try:
                outcome = call()
                self._redis_is(True)
                return outcome
            except Exception as exc:
                if not self._redis_failure(exc):
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

    def _load(self, ids: list[str]) -> list[Job | None]:
        """Snapshots of the jobs (None for one that is not there), a finished result's images included."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(f"{PREFIX}job:{job_id}", SNAPSHOT_FIELDS)
        records = [dict(zip(SNAPSHOT_FIELDS, values)) for values in pipe.execute()]
        counts = [int(record["images"] or 0) if record["status"] else 0 for record in records]
        for job_id, count in zip(ids, counts):
            if count:
                pipe.hmget(f"{PREFIX}job:{job_id}", [f"image:{index}" for index in range(count)])
        images = iter(pipe.execute())
        return [self._snapshot(job_id, record, next(images) if count else []) if record["status"] else None
                for job_id, record, count in zip(ids, records, counts)]

    @staticmethod
    def _snapshot(job_id: str, record: dict[str, bytes | None], images: list[bytes]) -> Job:
        job = Job(job_id, None, int(record["preview_every"] or 0) or None, (record["owner"] or b"").decode() or None,
                  status=JobStatus(record["status"].decode()), created=float(record["created"]),
                  started=_number(record["started"]), finished=_number(record["finished"]),
                  step=int(record["step"] or 0), total_steps=int(record["total_steps"] or 0),
                  preview=record["preview"] or None, preview_step=int(record["preview_step"] or 0),
                  cancel_requested_at=_number(record["cancel_requested_at"]),
                  stop_requested_at=_number(record["stop_requested_at"]), version=int(record["version"] or 0))
        job._first_step_at = _number(record["first_step_at"])
        job.request = request_from_json(record["request"]) if record["request"] else None
        if record["result"] and images:
            result = json.loads(record["result"])
            result["request"] = request_from_json(json.dumps(result["request"]))
            result["images"] = [GeneratedImage(data=data, **meta) for data, meta in zip(images, result["images"])]
            job.result = GenerationResult.model_validate(result)
        if record["error_type"]:
            error_type = ERROR_TYPES.get(record["error_type"].decode(), BackendError)
            job.error = error_type.__new__(error_type)
            BackendError.__init__(job.error, record["error_message"].decode(), record["error_param"].decode() or None)
        return job

    def _redis_is(self, reachable: bool) -> None:
        if reachable and not self._reachable:
            logger.info("Redis (SDXL_REDIS_URL) answers again: the shared queue goes on")
        self._reachable = reachable

    def _redis_failure(self, exc: Exception) -> bool:
        """True (and said once per outage) when `exc` is Redis out of reach."""
        import redis

        if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return False
        if self._reachable:
            logger.warning("Redis (SDXL_REDIS_URL) cannot be reached (%s): the shared queue waits for it",
                           type(exc).__name__)
        self._reachable = False
        return True


class ChangeFeed:
    """This replica's one subscription to the fleet's job changes (CHANGES): it wakes the
    requests waiting on a job, on their event loops, when a notice names it."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._subscription: redis.client.PubSub | None = None
        self._thread = threading.Thread(target=self._listen, name="sdxl-job-changes", daemon=True)

    @contextlib.contextmanager
    def watch(self, job_id: str, finals_only: bool = False) -> Iterator[asyncio.Event]:
        """An event set whenever a change to the job (its end only, with `finals_only`) is
        published, while the block runs (on an event loop)."""
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

    def start(self) -> None:
        """Subscribes (changes published from now on are noticed), then listens on a thread of its own."""
        try:
            self._subscription = self._subscribe()
        except Exception:  # Redis away: the thread subscribes once it is back
            self._subscription = None
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)

    def _subscribe(self) -> redis.client.PubSub:
        subscription = self.client.pubsub()
        try:
            subscription.subscribe(CHANGES)
            subscription.get_message(timeout=3)  # Redis's confirmation: from here on, every change is noticed
        except Exception:
            subscription.close()
            raise
        return subscription

    def _listen(self) -> None:
        while not self._closing.is_set():
            try:
                self._subscription = self._subscription or self._subscribe()
                while not self._closing.is_set():
                    notice = self._subscription.get_message(timeout=1.0)
                    if notice is not None and notice["type"] == "message":
                        job_id, _, final = notice["data"].decode().partition(" ")
                        self._wake(job_id, final == "final")
            except Exception:  # Redis away (the queue says so): waiters read their jobs every FALLBACK_S meanwhile
                self._closing.wait(1)
            finally:
                if self._subscription is not None:
                    self._subscription.close()
                self._subscription = None

    def _wake(self, job_id: str, final: bool) -> None:
        with self._lock:
            waiters = [(loop, event) for loop, event, finals_only in self._waiters.get(job_id, ())
                       if final or not finals_only]
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # (its loop closed: nobody waits any more)
                loop.call_soon_threadsafe(event.set)
