"""What a caller set through A1111's options, the same checks on both stores: this process's
memory (`MemoryCallerOptions`) and Redis (`SharedCallerOptions`, on a real `redis-server`)."""

from __future__ import annotations

import pytest

from backends.api.composition.caller_options import (
    MAX_OPTIONS_BYTES,
    CallerOptions,
    MemoryCallerOptions,
    SharedCallerOptions,
)
from backends.sdxl_backend.errors import InvalidRequest

REDIS_DATABASE = 8  # (a database of its own: other tests share the server)


@pytest.fixture(params=["memory", "redis"])
def store(request) -> CallerOptions:
    if request.param == "memory":
        return MemoryCallerOptions()
    import redis

    client = redis.Redis.from_url(f"{request.getfixturevalue('redis_server').url[:-2]}/{REDIS_DATABASE}")
    client.flushdb()
    return SharedCallerOptions(client)


def test_options_are_kept_per_caller_and_merged(store):
    assert store.get("key-a") == {}
    store.update("key-a", {"sd_model_checkpoint": "tiny-b", "jpeg_quality": 80, "styles": ["x"]})
    store.update("key-a", {"jpeg_quality": 90, "CLIP_stop_at_last_layers": 2})
    assert store.get("key-a") == {
        "sd_model_checkpoint": "tiny-b",
        "jpeg_quality": 90,
        "styles": ["x"],
        "CLIP_stop_at_last_layers": 2,
    }
    assert store.get("key-b") == {} and store.get("") == {}  # one caller never sees another's
    store.update("key-b", {})  # (nothing to change)
    assert store.get("key-b") == {}


def test_a_caller_cannot_grow_its_options_past_the_bound_and_nothing_changes(store):
    store.update("key-a", {"notes": "short"})
    with pytest.raises(InvalidRequest) as refused:
        store.update("key-a", {"notes": "x" * MAX_OPTIONS_BYTES})
    assert refused.value.param == "options"
    assert store.get("key-a") == {"notes": "short"}
