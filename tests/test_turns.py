"""Whose job runs next, stated twice: in Python (backends/sdxl_backend/jobs/turns.py, the memory
store's) and in Lua (the shared store's scripts, run by a real `redis-server` here). Hypothesis
draws queues (owners, priorities, the owners' last turns, image counts and batch keys) and the
two must agree: on the whole turn order (position.lua) and on the batch a device takes
(take.lua against `first_batch`)."""

from __future__ import annotations

import json
import time

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.sdxl_backend.jobs.redis_queue import keys, scripts
from backends.sdxl_backend.jobs.turns import PRIORITIES, QueueBounds, first_batch, slot, turn_order

REDIS_DATABASE = 12
OWNERS = ["", "alice", "bob", "carol"]


@st.composite
def queues(draw):
    """Waiting jobs in arrival order (owner, priority, images, batch key), the last turn of
    some of their slots, and the queue's bounds."""
    jobs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(OWNERS),
                st.sampled_from(list(PRIORITIES)),
                st.integers(1, 3),
                st.sampled_from([None, 1, 2]),
            ),
            max_size=12,
        )
    )
    slots = sorted({slot(owner, priority) for owner, priority, _, _ in jobs})
    last_turn = draw(st.dictionaries(st.sampled_from(slots), st.integers(1, 30)) if slots else st.just({}))
    bounds = QueueBounds(max_batch=draw(st.integers(1, 4)), order=draw(st.sampled_from(["fair", "fifo"])))
    return jobs, last_turn, bounds


@pytest.fixture(scope="module")
def store(redis_server):
    client = redis.Redis.from_url(f"{redis_server.url[:-2]}/{REDIS_DATABASE}")
    yield client, scripts.register(client, 1)
    client.flushdb()


def queued_in_redis(client, jobs, last_turn) -> list[str]:
    """The queue as the shared store keeps it (codec.submitted's fields that the scripts read)."""
    client.flushdb()
    ids = [f"job{index}" for index in range(len(jobs))]
    for job_id, (owner, priority, images, key) in zip(ids, jobs):
        client.hset(
            keys.job(job_id),
            mapping={
                "status": "queued",
                "owner": owner,
                "priority": priority,
                "n": images,
                "batch_key": json.dumps(key) if key is not None else "",
            },
        )
        client.rpush(keys.QUEUE, job_id)
    if last_turn:
        client.hset(keys.TURNS, mapping=last_turn)
    return ids


def run(store, name: str, bounds: QueueBounds, *arguments) -> object:
    client, registered = store
    common = [time.time(), bounds.ttl_s, bounds.max_jobs, bounds.max_bytes]
    return registered[name](keys=[keys.PREFIX], args=[*common, *arguments], client=client)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(queues())
def test_the_lua_turn_order_and_batch_are_turns_py(store, drawn):
    jobs, last_turn, bounds = drawn
    client = store[0]
    ids = queued_in_redis(client, jobs, last_turn)
    of = dict(zip(ids, jobs))
    expected = turn_order(ids, lambda job_id: slot(of[job_id][0], of[job_id][1]), last_turn, bounds.order)

    positions = {job_id: run(store, "position", bounds, job_id, bounds.order) for job_id in ids}
    assert sorted(ids, key=positions.__getitem__) == expected
    assert sorted(positions.values()) == list(range(1, len(ids) + 1))

    taken = [
        job_id.decode()
        for job_id in run(store, "take", bounds, "r", bounds.max_batch, bounds.lookahead, bounds.order, "d")
    ]
    assert taken == (
        first_batch(expected, lambda job_id: of[job_id][3], lambda job_id: of[job_id][2], bounds) if ids else []
    )
