"""Replicas sharing one Redis (SDXL_REDIS_URL): real `bentoml serve` processes and a real
`redis-server` on 127.0.0.1. Shared so far: the kept images behind `response_format: "url"`."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import httpx
import pytest

URL_REQUEST = {"prompt": "a lighthouse", "size": "64x64", "response_format": "url", "seed": 3}


@pytest.fixture(scope="module")
def replicas(serve, redis_server):
    env = {"SDXL_MODELS": "tiny-sdxl", "SDXL_REDIS_URL": redis_server.url, "SDXL_IMAGE_URL_TTL_SECONDS": "8",
           "SDXL_WARMUP": "false"}
    return serve("replica-a", env), serve("replica-b", env)


def image_path(replica, body=URL_REQUEST) -> str:
    answer = httpx.post(f"{replica.url}/v1/images/generations", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    return urlparse(answer.json()["data"][0]["url"]).path


def test_an_image_link_made_on_one_replica_is_served_by_the_other_until_it_expires(replicas):
    a, b = replicas
    path = image_path(a)
    from_a, from_b = (httpx.get(f"{replica.url}{path}", timeout=300) for replica in (a, b))
    assert from_a.status_code == from_b.status_code == 200
    assert from_b.content == from_a.content and from_b.headers["content-type"] == "image/png"
    time.sleep(9)  # past SDXL_IMAGE_URL_TTL_SECONDS
    assert httpx.get(f"{b.url}{path}", timeout=300).status_code == 410
    image_path(b)  # (an image added sweeps the expired ones: the link stays gone, 410, not unknown)
    assert httpx.get(f"{a.url}{path}", timeout=300).status_code == 410
    assert httpx.get(f"{a.url}/v1/images/files/never-made.png", timeout=300).status_code == 404


def test_redis_out_of_reach_is_a_quick_503_and_the_replicas_recover(replicas, redis_server):
    a, b = replicas
    redis_server.stop()
    try:
        jobs_before = len(httpx.get(f"{a.url}/v1/jobs", params={"limit": 100}, timeout=300).json()["jobs"])
        refused = httpx.post(f"{a.url}/v1/images/generations", json=URL_REQUEST, timeout=300)
        assert refused.status_code == 503
        assert "the shared store (Redis, SDXL_REDIS_URL) cannot be reached" in refused.json()["error"]["message"]
        assert httpx.get(f"{b.url}/v1/images/files/any.png", timeout=300).status_code == 503
        assert httpx.get(f"{b.url}/health", timeout=300).status_code == 200  # the rest still serves
        # Refused before it was queued: no device work was spent on images nobody could fetch.
        assert len(httpx.get(f"{a.url}/v1/jobs", params={"limit": 100}, timeout=300).json()["jobs"]) == jobs_before
    finally:
        redis_server.start()
    path = image_path(a)
    assert httpx.get(f"{b.url}{path}", timeout=300).status_code == 200
