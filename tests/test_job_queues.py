"""The job queue contract (backends/sdxl_backend/jobs/contract.py), one suite run against both
stores: this process's memory, and Redis (a real `redis-server`, a database of its own). The
engine is the real tiny one; the device worker is the real one. Where a test needs a job held
running, `parked` is the test seam: the worker stops after a given step until released."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from pathlib import Path

import pytest

from backends.api.composition.devices import DeviceLost
from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.device_thread import DeviceThread
from backends.sdxl_backend.errors import Cancelled, JobExpired, QueueFull, TimedOut, UnknownJob
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.jobs import JobStatus, MemoryJobQueue
from backends.sdxl_backend.jobs.turns import QueueBounds
from backends.sdxl_backend.jobs.worker import Device
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from backends.sdxl_backend.upscale_protocol import UpscaleRequest, UpscaleResult
from models.catalog import defaults_for
from tests.conftest import png_bytes
from tests.polling import poll

REDIS_DATABASE = 11
QUICK = {"prompt": "a quick one", "width": 64, "height": 64, "steps": 3}
HELD = {**QUICK, "steps": 6}


@pytest.fixture(scope="module")
def engine(tiny_model):
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    return Engine(ModelManager([source], select_placement()), "tiny-sdxl")


@pytest.fixture(params=["memory", "redis"])
def make_queue(request, engine):
    """Makes the store under test (closed after the test), with the given bounds."""
    made = []

    def make(on_change=None, devices=None, **bounds):
        devices = devices or [Device.alone(engine)]
        if request.param == "memory":
            queue = MemoryJobQueue(devices, QueueBounds(**bounds), on_change)
        else:
            import redis

            from backends.sdxl_backend.jobs.redis_queue import SharedJobQueue

            store = redis.Redis.from_url(f"{request.getfixturevalue('redis_server').url[:-2]}/{REDIS_DATABASE}")
            store.flushdb()
            queue = SharedJobQueue(devices, store, QueueBounds(**bounds), on_change)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close()


def prepared(engine, **fields):
    return engine.prepare(GenerationRequest(**{**QUICK, **fields}))


def starts_of(told):
    """The jobs in the order they started (the observer also hears of each step, as running)."""
    return list(dict.fromkeys(job_id for job_id, status in told if status == JobStatus.RUNNING))


def final(queue, job):
    """The job once final (the memory store's jobs are live objects, the shared store's snapshots)."""
    return asyncio.run(queue.wait(job, 600))


@contextlib.contextmanager
def parked(queue, at_step: int):
    """Test seam: the device worker stops after step `at_step` of a job until the block ends
    (or `release` is set). Yields (reached, release)."""
    reached, release = threading.Event(), threading.Event()
    original = queue.after_step

    def after_step(job):
        original(job)
        if job.step == at_step:
            reached.set()
            release.wait(600)

    queue.after_step = after_step
    try:
        yield reached, release
    finally:
        release.set()


def test_submit_get_and_owners(make_queue, engine, monkeypatch):
    # (the Redis store reads owners a page at a time: one a page, so that alice's is on the second)
    monkeypatch.setattr("backends.sdxl_backend.jobs.redis_queue.queue.OWNERS_PAGE", 1)
    queue = make_queue()
    mine = queue.submit(prepared(engine), "alice")
    theirs = queue.submit(prepared(engine), "bob")
    assert queue.get(mine.id, "alice").status == JobStatus.QUEUED
    assert queue.get(mine.id).owner == "alice"  # no owner given: every job is visible
    with pytest.raises(UnknownJob):
        queue.get(mine.id, "bob")  # another owner's job is as unknown as a missing one
    with pytest.raises(UnknownJob):
        queue.get("0" * 32)
    assert [job.id for job in queue.recent(owner="alice")] == [mine.id]
    assert [job.id for job in queue.recent()] == [theirs.id, mine.id]  # newest first
    assert [job.id for job in queue.recent(limit=1)] == [theirs.id]
    assert [job.id for job in queue.recent(limit=1, before=theirs.created)] == [mine.id]  # the next page
    assert [job.id for job in queue.recent(limit=1, owner="alice")] == [mine.id]  # not cut before the owner's


def test_positions_move_up_as_queued_jobs_are_cancelled(make_queue, engine):
    queue = make_queue()  # (not started: everything stays queued)
    jobs = [queue.submit(prepared(engine)) for _ in range(3)]
    assert [queue.position(job) for job in jobs] == [1, 2, 3] and queue.queue_length == 3
    queue.cancel(jobs[1])
    cancelled = queue.refresh(jobs[1])
    assert cancelled.status == JobStatus.CANCELLED and isinstance(cancelled.error, Cancelled)
    assert queue.position(cancelled) == 0 and queue.position(queue.refresh(jobs[2])) == 2
    queue.stop_early(jobs[0], "interrupted")  # a queued job asked to stop early is cancelled
    assert queue.refresh(jobs[0]).status == JobStatus.CANCELLED and queue.queue_length == 1


def test_a_full_queue_refuses_with_a_retry_after(make_queue, engine):
    queue = make_queue(max_queue=2)
    queue.submit(prepared(engine))
    queue.submit(prepared(engine))
    with pytest.raises(QueueFull) as refused:
        queue.submit(prepared(engine))
    assert refused.value.retry_after_s == 5  # nothing has run yet: the default guess, in either store


def test_a_job_runs_and_a_delivered_result_is_forgotten(make_queue, engine):
    queue = make_queue()
    queue.start()
    job = queue.submit(prepared(engine, seed=7), "alice")
    done = final(queue, job)
    assert done.status == JobStatus.SUCCEEDED and done.step == done.total_steps == 3
    assert done.result.images[0].seed == 7 and done.finished >= done.started
    queue.forget_result(done)
    assert queue.get(job.id).result is None and queue.get(job.id).status == JobStatus.SUCCEEDED
    assert queue.alive and not queue.running_here


def test_run_answers_a_waiting_client_and_keeps_only_the_record(make_queue, engine):
    queue = make_queue()
    queue.start()
    result = asyncio.run(queue.run(prepared(engine, seed=9), "alice", 600))
    assert result.images[0].seed == 9
    (record,) = queue.recent(owner="alice")
    assert record.status == JobStatus.SUCCEEDED and record.result is None


def test_run_past_its_time_cancels_the_job(make_queue, engine):
    queue = make_queue()
    queue.start()
    with parked(queue, 1) as (reached, release):

        def release_once_cancelled():
            reached.wait(600)
            while queue.running and queue.running[0].cancel_requested_at is None:
                time.sleep(0.01)
            release.set()

        threading.Thread(target=release_once_cancelled, daemon=True).start()
        with pytest.raises(TimedOut):
            asyncio.run(queue.run(prepared(engine, **HELD), None, 0.2))
    (job,) = queue.recent()
    assert job.status == JobStatus.CANCELLED and job.step < job.total_steps


def test_run_cancelled_by_its_caller_cancels_the_job(make_queue, engine):
    queue = make_queue()
    queue.start()

    async def abandon():
        task = asyncio.ensure_future(queue.run(prepared(engine, **HELD), None, 600))
        await asyncio.to_thread(reached.wait, 600)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with parked(queue, 1) as (reached, _):
        asyncio.run(abandon())
    (job,) = queue.recent()
    assert final(queue, job).status == JobStatus.CANCELLED


@pytest.mark.parametrize("ask", ["cancel", "stop_early"])
def test_a_running_job_is_cancelled_or_stopped_early_at_its_next_step(make_queue, engine, ask):
    queue = make_queue()
    queue.start()
    with parked(queue, 2) as (reached, release):
        job = queue.submit(prepared(engine, **HELD))
        reached.wait(600)
        assert queue.refresh(job).status == JobStatus.RUNNING and queue.position(queue.refresh(job)) == 0
        if ask == "cancel":
            queue.cancel(job)
        else:
            queue.stop_early(job, "interrupted")
        release.set()
        done = final(queue, job)
    if ask == "cancel":
        assert done.status == JobStatus.CANCELLED and done.result is None and done.cancel_requested_at
    else:
        assert done.status == JobStatus.SUCCEEDED and done.result.images and done.stopped_early
    # Asked after step 2: a cancel ends it before step 3 counts; a stop counts step 3 and decodes.
    assert done.step == (2 if ask == "cancel" else 3) < done.total_steps
    assert queue.alive  # the device goes on
    assert final(queue, queue.submit(prepared(engine))).status == JobStatus.SUCCEEDED


def test_a_watcher_is_woken_by_each_change(make_queue, engine):
    queue = make_queue()
    job = queue.submit(prepared(engine))

    async def follow():
        current, seen = job, []
        while not current.status.final:
            before = current.version
            current = await queue.changed(current, before, 600)
            assert current.version > before or current.status.final
            seen.append((current.status, current.step))
        return seen

    async def start_later():
        waiting = asyncio.ensure_future(follow())
        await asyncio.sleep(0)  # (the watcher is in place before anything runs)
        queue.start()
        return await waiting

    seen = asyncio.run(start_later())
    assert seen[-1] == (JobStatus.SUCCEEDED, 3) and seen == sorted(seen, key=lambda change: change[1])
    quiet = queue.get(job.id)
    assert asyncio.run(queue.changed(quiet, quiet.version, 0.05)).version == quiet.version  # no change: the timeout


def test_compatible_jobs_run_in_one_batch_in_arrival_order(make_queue, engine):
    told = []
    queue = make_queue(max_batch=4, on_change=lambda job: told.append((job.id, job.status)))
    first, second = queue.submit(prepared(engine, seed=1)), queue.submit(prepared(engine, seed=2))
    other = queue.submit(prepared(engine, width=128))  # another size: another pipeline call
    third = queue.submit(prepared(engine, seed=3))
    queue.start()
    for job in (first, second, other, third):
        final(queue, job)
    assert starts_of(told) == [first.id, second.id, third.id, other.id]
    first_end = next(index for index, (_, status) in enumerate(told) if status == JobStatus.SUCCEEDED)
    assert {job_id for job_id, status in told[:first_end] if status == JobStatus.RUNNING} == {
        first.id,
        second.id,
        third.id,
    }  # all three started before any ended: one call
    assert [final(queue, job).result.images[0].seed for job in (first, second, third)] == [1, 2, 3]


def upscale(engine, **fields):
    return engine.upscaling.prepare(UpscaleRequest(image=png_bytes(40, 30), upscaler="lanczos", **fields))


def test_an_upscale_is_a_job_that_takes_its_turn_and_never_joins_a_batch(make_queue, engine):
    told = []
    queue = make_queue(max_batch=4, on_change=lambda job: told.append((job.id, job.status)))
    first = queue.submit(prepared(engine))
    larger = queue.submit(upscale(engine), "alice")
    second = queue.submit(prepared(engine, seed=2))
    queue.start()
    done = final(queue, larger)
    assert starts_of(told) == [first.id, second.id, larger.id]  # the two generations in one call, then it
    assert done.kind == "upscale" and done.status == JobStatus.SUCCEEDED and done.request.upscaler == "lanczos"
    assert isinstance(done.result, UpscaleResult) and (done.result.width, done.result.height) == (80, 60)
    assert done.result.device == engine.models.placement.device.type  # (the device that ran it)
    assert {job.kind for job in queue.recent()} == {"generation", "upscale"}
    assert queue.recent(owner="alice")[0].result.data == done.result.data  # (read back whole from either store)


def test_an_upscale_waits_for_its_client_and_can_be_cancelled_while_queued(make_queue, engine):
    queue = make_queue()  # (not started yet: what it holds stays queued)
    waiting = queue.submit(upscale(engine))
    queue.cancel(waiting)
    assert queue.refresh(waiting).status == JobStatus.CANCELLED and queue.queue_length == 0
    queue.start()
    result = asyncio.run(queue.run(upscale(engine, scale=3), "alice", 600))
    assert isinstance(result, UpscaleResult) and (result.width, result.height) == (120, 90)


def test_finished_jobs_are_evicted_by_count_and_leave_a_tombstone(make_queue, engine):
    queue = make_queue(max_jobs=1)
    queue.start()
    older = final(queue, queue.submit(prepared(engine)))
    newer = final(queue, queue.submit(prepared(engine)))
    with pytest.raises(JobExpired):
        queue.get(older.id)  # gone, and said to be (410), not unknown (404)
    assert queue.get(newer.id).status == JobStatus.SUCCEEDED
    assert [job.id for job in queue.recent()] == [newer.id]


def test_a_forgotten_id_answers_expired_for_the_tombstones_time_then_unknown(make_queue, engine):
    """One rule in both stores: 410 while the tombstone lasts (`tombstone_ttl_s`), 404 after."""
    queue = make_queue(max_jobs=1, tombstone_ttl_s=1)
    queue.start()
    older = final(queue, queue.submit(prepared(engine)))
    final(queue, queue.submit(prepared(engine)))

    def lookup() -> type[Exception] | None:
        try:
            queue.get(older.id)
        except (JobExpired, UnknownJob) as refused:
            return type(refused)
        return None

    assert lookup() is JobExpired
    assert (
        poll(lookup, until=lambda answer: answer is not JobExpired, timeout=30, what="the tombstone's end")
        is UnknownJob
    )


def test_close_stops_the_device_worker(make_queue, engine):
    queue = make_queue()
    queue.start()
    final(queue, queue.submit(prepared(engine)))
    assert queue.alive
    queue.close()
    assert not queue.alive
    assert math.isfinite(queue.retry_after_s())


def test_owners_take_turns_so_one_flood_does_not_starve_another(make_queue, engine):
    told = []
    queue = make_queue(on_change=lambda job: told.append((job.id, job.status)))
    queue.start()
    with parked(queue, 1) as (reached, release):
        flood = [queue.submit(prepared(engine), "alice")]
        reached.wait(600)  # alice's first job holds the device
        flood += [queue.submit(prepared(engine), "alice") for _ in range(9)]
        late = queue.submit(prepared(engine), "bob")
        # bob's one job is next: alice had the last turn
        assert queue.position(queue.refresh(late)) == 1
        assert [queue.position(queue.refresh(job)) for job in flood[1:4]] == [2, 3, 4]
        release.set()
        for job in [*flood, late]:
            final(queue, job)
    assert starts_of(told)[:3] == [flood[0].id, late.id, flood[1].id]


def test_without_turns_a_flood_goes_first_in_arrival_order(make_queue, engine):
    queue = make_queue(order="fifo")  # (not started)
    flood = [queue.submit(prepared(engine), "alice") for _ in range(3)]
    late = queue.submit(prepared(engine), "bob")
    assert [queue.position(job) for job in [*flood, late]] == [1, 2, 3, 4]


def test_priorities_go_first_and_positions_say_the_order_jobs_start_in(make_queue, engine):
    told = []
    queue = make_queue(on_change=lambda job: told.append((job.id, job.status)))
    low = queue.submit(prepared(engine, priority="low"), "alice")
    alices = [queue.submit(prepared(engine), "alice") for _ in range(3)]
    bobs = [queue.submit(prepared(engine), "bob") for _ in range(2)]
    high = queue.submit(prepared(engine, priority="high"), "bob")
    jobs = [low, *alices, *bobs, high]
    positions = {job.id: queue.position(job) for job in jobs}
    assert positions[high.id] == 1 and positions[low.id] == len(jobs)
    assert [positions[job.id] for job in (alices[0], bobs[0], alices[1], bobs[1], alices[2])] == [2, 3, 4, 5, 6]
    queue.start()
    for job in jobs:
        final(queue, job)
    assert starts_of(told) == sorted(positions, key=positions.get)  # truthful: they started in that order


def test_one_owners_bound_refuses_that_owner_only(make_queue, engine):
    queue = make_queue(max_queued_per_owner=2, max_queue=3)
    queue.submit(prepared(engine), "alice")
    queue.submit(prepared(engine), "alice")
    with pytest.raises(QueueFull, match="SDXL_MAX_QUEUED_PER_KEY") as refused:
        queue.submit(prepared(engine), "alice")
    assert refused.value.retry_after_s == 5
    assert queue.submit(prepared(engine), "bob").status == JobStatus.QUEUED
    with pytest.raises(QueueFull, match="SDXL_MAX_QUEUE\\)"):  # and the whole queue's bound still holds
        queue.submit(prepared(engine), "carol")


def test_compatible_jobs_of_several_owners_share_a_batch(make_queue, engine):
    told = []
    queue = make_queue(max_batch=4, on_change=lambda job: told.append((job.id, job.status)))
    jobs = [queue.submit(prepared(engine, seed=seed), owner) for seed, owner in enumerate(["a", "a", "a", "b"])]
    queue.start()
    for job in jobs:
        final(queue, job)
    first_end = next(index for index, (_, status) in enumerate(told) if status == JobStatus.SUCCEEDED)
    assert set(starts_of(told[:first_end])) == {job.id for job in jobs}  # all four in one call
    assert [final(queue, job).result.images[0].seed for job in jobs] == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def second_engine(tiny_model):
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    return Engine(ModelManager([source], select_placement()), "tiny-sdxl")


def two_devices(engine, second_engine):
    return [Device("cpu#0", engine, DeviceThread(1)), Device("cpu#1", second_engine, DeviceThread(1))]


def test_two_devices_run_jobs_side_by_side_and_say_which_ran_each(make_queue, engine, second_engine):
    queue = make_queue(devices=two_devices(engine, second_engine))
    queue.start()
    with parked(queue, 1) as (_reached, release):
        jobs = [queue.submit(prepared(engine, **HELD)) for _ in range(2)]
        while len(queue.running_here) < 2:  # both held at step 1: one on each device
            time.sleep(0.01)
        assert {job.device for job in queue.running_here} == {"cpu#0", "cpu#1"}
        release.set()
        done = [final(queue, job) for job in jobs]
    assert {job.device for job in done} == {"cpu#0", "cpu#1"} and all(job.result for job in done)


def test_a_lost_device_fails_its_job_and_the_other_serves_on(make_queue, engine, second_engine):
    class LostEngine:  # the second device, gone at its first job
        def __getattr__(self, name):
            return getattr(second_engine, name)

        def run_batch(self, batch):  # (what the device worker calls)
            raise DeviceLost()

    devices = [Device("cpu#0", engine, DeviceThread(1)), Device("cpu#1", LostEngine(), DeviceThread(1))]
    queue = make_queue(devices=devices)
    busy = threading.Event()
    devices[0].thread.call(lambda: busy.wait(600))  # the first device is busy: the lost one takes the job
    queue.start()
    lost = final(queue, queue.submit(prepared(engine)))
    busy.set()
    assert lost.status == JobStatus.FAILED and lost.device == "cpu#1"
    assert "device cpu#1 stopped" in lost.error.message
    devices[1].thread.join(60)
    assert not queue.workers[1].alive and queue.alive
    served = final(queue, queue.submit(prepared(engine)))
    assert served.status == JobStatus.SUCCEEDED and served.device == "cpu#0" and queue.alive


def test_a_jobs_webhook_travels_with_it_and_its_deliveries_are_kept(make_queue, engine):
    told = []
    queue = make_queue(on_change=told.append)
    spec = {"url": "http://127.0.0.1:9/hook", "events": ["started", "completed"], "images": "url", "base_url": "x"}
    job = queue.submit(prepared(engine), "alice", None, spec)
    queue.start()
    final(queue, job)
    assert told and all(seen.webhook == spec for seen in told)  # where it runs too (the shared store: decoded there)
    queue.record_webhook(job.id, "completed", {"status": "delivered", "attempts": 1})
    kept = queue.get(job.id)
    assert kept.webhook == spec and kept.webhooks == {"completed": {"status": "delivered", "attempts": 1}}
    queue.record_webhook("0" * 32, "completed", {"status": "failed"})  # a job no longer held: nothing is made
    with pytest.raises(UnknownJob):
        queue.get("0" * 32)


def test_a_shared_queues_replicas_publish_their_cards_with_their_heartbeats(make_queue):
    queue = make_queue()
    queue.start()
    if isinstance(queue, MemoryJobQueue):  # (alone: no other replica to hear of)
        assert queue.replicas() == []
        return
    [card] = queue.replicas()
    assert card["replica"] == queue.replica and card["beat"] > 0


def test_recent_jobs_can_be_read_without_their_images(make_queue, engine):
    queue = make_queue()
    job = queue.submit(prepared(engine))
    queue.start()
    final(queue, job)
    [whole], [record] = queue.recent(1), queue.recent(1, images=False)
    assert whole.result.images and (record.id, record.status, record.step) == (job.id, "succeeded", whole.step)
    if not isinstance(queue, MemoryJobQueue):  # (Redis: the images stay there, a few bytes come back)
        assert record.result is None
