"""What a ComfyUI prompt adds to its job, the same checks on both stores: this process's memory
(`MemoryPromptRecords`) and Redis (`SharedPromptRecords`, on a real `redis-server`)."""

from __future__ import annotations

import pytest

from backends.api.comfyui.records import (
    CLIENT_PROMPTS,
    MemoryPromptRecords,
    PromptRecord,
    PromptRecords,
    SharedPromptRecords,
)
from tests.polling import poll

REDIS_DATABASE = 10  # (a database of its own: other tests share the server)


@pytest.fixture(params=["memory", "redis"])
def records(request) -> PromptRecords:
    if request.param == "memory":
        return MemoryPromptRecords(ttl_s=1)
    import redis

    client = redis.Redis.from_url(f"{request.getfixturevalue('redis_server').url[:-2]}/{REDIS_DATABASE}")
    client.flushdb()
    return SharedPromptRecords(client, ttl_s=1)


def record(client_id: str | None, number: int = 1) -> PromptRecord:
    return PromptRecord(
        number=number,
        client_id=client_id,
        outputs={"9": "output", "10": "temp"},
        sampler="3",
        executed=["4", "3", "8", "9", "10"],
        images=2,
        workflow={"9": {"class_type": "SaveImage", "inputs": {}}},
        extra_data={"extra_pnginfo": {"workflow": {}}},
    )


def test_a_record_reads_back_whole_and_numbers_increase(records):
    first, second = records.next_number(), records.next_number()
    assert second > first
    records.put("a" * 32, record("client-1", first))
    assert records.get("a" * 32) == record("client-1", first)
    assert records.get("b" * 32) is None


def test_a_clients_prompts_are_listed_oldest_first_and_other_clients_never(records):
    for index in range(3):
        records.put(f"{index:032d}", record("client-1"))
    records.put("f" * 32, record("client-2"))
    records.put("e" * 32, record(None))  # (queued without a client id: no socket follows it)
    assert records.of_client("client-1") == [f"{index:032d}" for index in range(3)]
    assert records.of_client("client-2") == ["f" * 32] and records.of_client("nobody") == []
    records.delete(f"{1:032d}")
    assert records.of_client("client-1") == [f"{0:032d}", f"{2:032d}"] and records.get(f"{1:032d}") is None


def test_a_client_follows_its_newest_prompts_only(records):
    for index in range(CLIENT_PROMPTS + 5):
        records.put(f"{index:032d}", record("busy"))
    listed = records.of_client("busy")
    assert len(listed) == CLIENT_PROMPTS and listed[-1] == f"{CLIENT_PROMPTS + 4:032d}"


def test_records_expire_with_their_jobs(records):
    records.put("a" * 32, record("client-1"))
    poll(lambda: records.get("a" * 32), lambda kept: kept is None, timeout=60)
    assert records.of_client("client-1") == []
