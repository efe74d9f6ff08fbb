"""A shared server, served: API keys with priorities, and several devices in one process
(SDXL_DEVICES). Three CPU "devices" here, the third lost at its first job through the test seam
SDXL_TEST_FAULT_DEVICE (a GPU falling off its bus cannot happen on this machine). The order in
which jobs take turns is tested on both stores in tests/test_job_queues.py."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.test_jobs import submit, wait

PRIORITY_KEY, PLAIN_KEY = "key-with-priority-0123", "plain-key-0123456789"
# Long enough that a device is still busy with it when the next job comes (no timing is asserted).
HELD = {"prompt": "a held one", "width": 256, "height": 256, "steps": 40, "seed": 5}


@pytest.fixture(scope="module")
def shared(serve_for_module):
    return serve_for_module(
        "shared",
        {
            "SDXL_MODELS": "tiny-sdxl",
            "SDXL_DEVICES": "cpu,cpu,cpu",
            "SDXL_TEST_FAULT_DEVICE": "cpu#2",
            "SDXL_API_KEYS": f"{PRIORITY_KEY},{PLAIN_KEY}",
            "SDXL_PRIORITY_KEYS": PRIORITY_KEY,
            "SDXL_MAX_BATCH": "1",
        },
    )


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def first_jobs(shared):
    """The server's first three jobs, one for each device: the third device is lost there (so
    no other test's job meets it)."""
    key = as_key(PLAIN_KEY)
    jobs = [submit(shared, HELD, headers=key) for _ in range(3)]
    return [wait(shared, job["id"], headers=key)[0] for job in jobs]


def test_high_priority_is_for_the_listed_keys_on_every_route(shared, first_jobs):
    refused = httpx.post(
        f"{shared.url}/v1/jobs", json={**HELD, "priority": "high"}, headers=as_key(PLAIN_KEY), timeout=300
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["param"] == "priority" and "SDXL_PRIORITY_KEYS" in refused.json()["error"]["message"]
    a1111 = httpx.post(
        f"{shared.url}/sdapi/v1/txt2img",
        json={"prompt": "x", "steps": 2, "width": 64, "height": 64, "priority": "high"},
        headers=as_key(PLAIN_KEY),
        timeout=300,
    )
    assert a1111.status_code == 403
    client = openai.OpenAI(base_url=f"{shared.url}/v1", api_key=PLAIN_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="SDXL_PRIORITY_KEYS"):
        client.images.generate(prompt="x", size="64x64", extra_body={"priority": "high"})
    allowed = submit(shared, {**HELD, "steps": 2, "priority": "high"}, headers=as_key(PRIORITY_KEY))
    assert allowed["priority"] == "high"
    assert wait(shared, allowed["id"], headers=as_key(PRIORITY_KEY))[0]["status"] == "succeeded"
    low = client.images.generate(prompt="x", size="64x64", extra_body={"priority": "low", "steps": 2})
    assert low.data[0].b64_json


def test_jobs_run_on_every_device_and_a_lost_one_does_not_stop_the_others(shared, first_jobs):
    key = as_key(PLAIN_KEY)
    (lost,) = [job for job in first_jobs if job["status"] == "failed"]
    assert lost["device"] == "cpu#2" and "device cpu#2 stopped" in lost["error"]["message"]
    served = [job for job in first_jobs if job["status"] == "succeeded"]
    assert sorted(job["device"] for job in served) == ["cpu#0", "cpu#1"]
    assert all(job["result"]["device"] == job["device"] for job in served)
    answer = httpx.post(f"{shared.url}/v1/txt2img", json={**HELD, "steps": 2}, headers=key, timeout=300).json()
    assert answer["device"] in ("cpu#0", "cpu#1")  # a synchronous answer says it too
    assert httpx.get(f"{shared.url}/readyz", timeout=300).status_code == 200
    status = httpx.get(f"{shared.url}/v1/system/status", headers=key, timeout=300).json()
    assert [(d["name"], d["alive"]) for d in status["devices"]] == [("cpu#0", True), ("cpu#1", True), ("cpu#2", False)]
    assert status["device_thread_alive"]
    after = [submit(shared, {**HELD, "steps": 2}, headers=key) for _ in range(4)]
    assert {wait(shared, job["id"], headers=key)[0]["device"] for job in after} <= {"cpu#0", "cpu#1"}
    assert all(wait(shared, job["id"], headers=key)[0]["status"] == "succeeded" for job in after)
