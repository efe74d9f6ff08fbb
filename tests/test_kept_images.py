"""The kept images behind `response_format: "url"`, the same checks on both stores: this
process's memory (`KeptImages`) and Redis (`SharedKeptImages`, on a real `redis-server`)."""

from __future__ import annotations

import pytest

from backends.api.jobs.kept_images import KeptImages, KeptImageStore, SharedKeptImages
from tests.polling import poll

REDIS_DATABASE = 7  # (a database of its own: other tests share the server)


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """`make_store(ttl_s, max_bytes)`: an empty store of the parameter's kind."""
    stores: list[KeptImageStore] = []

    def make(ttl_s: float, max_bytes: int) -> KeptImageStore:
        if request.param == "memory":
            store: KeptImageStore = KeptImages(ttl_s, max_bytes)
        else:
            import redis

            client = redis.Redis.from_url(f"{request.getfixturevalue('redis_server').url[:-2]}/{REDIS_DATABASE}")
            client.flushdb()
            store = SharedKeptImages(client, ttl_s, max_bytes)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_an_image_is_kept_with_its_media_type_and_an_unknown_id_is_not_gone(make_store):
    kept = make_store(ttl_s=60, max_bytes=100)
    image_id = kept.put(b"\x89PNG-ish", "image/png", "png")
    assert image_id.endswith(".png") and len(image_id) > 20  # unguessable: the link is the key
    found = kept.get(image_id)
    assert (found.data, found.media_type) == (b"\x89PNG-ish", "image/png")
    assert kept.total_bytes == 8 and not kept.expired(image_id)
    assert kept.get("never.png") is None and not kept.expired("never.png")  # 404, not 410


def test_the_cap_pushes_out_the_oldest_which_then_reads_as_gone(make_store):
    kept = make_store(ttl_s=60, max_bytes=10)
    first = kept.put(b"123456", "image/png", "png")
    second = kept.put(b"7890", "image/png", "png")
    third = kept.put(b"abcde", "image/webp", "webp")  # 6 + 4 + 5 > 10: the first goes
    assert kept.get(first) is None and kept.expired(first)
    assert kept.get(second).data == b"7890" and kept.get(third).media_type == "image/webp"
    assert kept.total_bytes == 9


def test_an_image_past_its_time_is_gone_and_its_bytes_are_freed(make_store):
    kept = make_store(ttl_s=0.3, max_bytes=100)
    image_id = kept.put(b"12345", "image/png", "png")
    poll(lambda: kept.get(image_id), until=lambda found: found is None, timeout=30, what="the image to expire")
    assert kept.expired(image_id)
    kept.put(b"67", "image/png", "png")  # (the store settles its total when it next keeps one)
    assert kept.total_bytes == 2


def test_a_memory_store_expires_by_its_clock():
    now = [0.0]
    kept = KeptImages(ttl_s=10, max_bytes=10, clock=lambda: now[0])
    image_id = kept.put(b"abc", "image/png", "png")
    now[0] = 9.9
    assert kept.get(image_id) is not None
    now[0] = 10.5
    assert kept.get(image_id) is None and kept.expired(image_id) and kept.total_bytes == 0
    kept.close()
