"""Jobs over plain HTTP: submit, poll, events, previews, cancel, disconnects, limits.

A 1024x1024, 30-step tiny-sdxl job runs about 4 s here: long enough to watch and cancel."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from tests.served import Server

LONG = {"prompt": "a slow one", "width": 1024, "height": 1024, "steps": 30, "seed": 1}
SHORT = {"prompt": "a quick one", "width": 64, "height": 64, "steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def jobs_server(tiny_model, tmp_path_factory):
    server = Server({"SDXL_MODELS": "tiny-sdxl", "SDXL_MAX_QUEUE": "2", "SDXL_JOB_TTL_SECONDS": "4"},
                    tmp_path_factory.mktemp("jobs") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def submit(server, body) -> dict:
    response = httpx.post(f"{server.url}/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == response.json()["links"]["self"]
    return response.json()


def get(server, job_id: str) -> dict:
    return httpx.get(f"{server.url}/v1/jobs/{job_id}").json()


def wait(server, job_id: str, until=lambda job: job["status"] in ("succeeded", "failed", "cancelled"),
         timeout: float = 60) -> tuple[dict, list[dict]]:
    """Poll until `until`; returns the last state and every state seen."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(get(server, job_id))
        if until(seen[-1]):
            return seen[-1], seen
        time.sleep(0.05)
    raise TimeoutError(seen[-1])


def test_submit_poll_and_result(jobs_server):
    job = submit(jobs_server, LONG)
    assert job["status"] in ("queued", "running") and job["percent"] == 0.0
    done, seen = wait(jobs_server, job["id"])
    assert done["status"] == "succeeded"
    percents = [state["percent"] for state in seen]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert len(set(percents)) > 5  # progress was seen in between, not only 0 and 100
    running = [s for s in seen if s["status"] == "running" and s["step"] > 2]
    assert running and all(s["eta_s"] is not None and s["total_steps"] == 30 for s in running)
    result = done["result"]
    assert result["parameters"]["steps"] == 30 and result["images"][0]["seed"] == 1
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0]["b64_json"])))
    assert image.size == (1024, 1024)
    listed = httpx.get(f"{jobs_server.url}/v1/jobs").json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]


def test_img2img_job_and_bad_body(jobs_server):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    job = submit(jobs_server, {**SHORT, "steps": 4, "image": base64.b64encode(png.getvalue()).decode()})
    done, _ = wait(jobs_server, job["id"])
    assert done["status"] == "succeeded" and done["total_steps"] == 3  # 4 steps x strength 0.75
    bad = httpx.post(f"{jobs_server.url}/v1/jobs", json={**SHORT, "width": 63})
    assert bad.status_code == 202  # validated when it runs, like every generation: the job fails
    failed, _ = wait(jobs_server, bad.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["param"] == "width"
    assert httpx.post(f"{jobs_server.url}/v1/jobs", json={**SHORT, "steps": "many"}).status_code == 400


def test_cancel_queued_and_running_jobs_then_the_next_runs(jobs_server):
    running = submit(jobs_server, LONG)
    queued = submit(jobs_server, LONG)
    assert queued["queue_position"] == 1
    wait(jobs_server, running["id"], until=lambda job: job["step"] >= 3)

    cancelled_queued = httpx.delete(f"{jobs_server.url}/v1/jobs/{queued['id']}").json()
    assert cancelled_queued["status"] == "cancelled" and cancelled_queued["elapsed_s"] is None
    asked = time.monotonic()
    httpx.post(f"{jobs_server.url}/v1/jobs/{running['id']}/cancel")
    stopped, _ = wait(jobs_server, running["id"])
    freed_in = time.monotonic() - asked
    assert stopped["status"] == "cancelled"
    assert 3 <= stopped["step"] < 20, stopped["step"]  # stopped at the next step, far from the 30th
    assert stopped["cancel_to_free_s"] < 1.0 and freed_in < 2.0
    assert stopped["error"]["type"] == "cancelled"

    after = submit(jobs_server, SHORT)
    assert wait(jobs_server, after["id"])[0]["status"] == "succeeded"
    assert get(jobs_server, queued["id"])["step"] == 0  # never started
    print(f"\ncancel -> device free: {stopped['cancel_to_free_s']} s (server), {freed_in:.3f} s (client)")


def read_events(server, job_id: str) -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", timeout=60) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_events_stream_progress_previews_and_result(jobs_server):
    job = submit(jobs_server, {**LONG, "steps": 12, "preview_every": 4})
    events = read_events(jobs_server, job["id"])
    names = [name for name, _ in events]
    assert names[-1] == "result" and events[-1][1]["result"]["images"]
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and max(steps) == 12 and len(set(steps)) >= 6
    previews = [data for name, data in events if name == "preview"]
    assert {p["step"] for p in previews} <= {4, 8, 12} and previews
    preview = Image.open(io.BytesIO(base64.b64decode(previews[-1]["b64_json"])))
    assert preview.size == (128, 128)  # the latent grid: 1/8 of the image
    fetched = httpx.get(f"{jobs_server.url}/v1/jobs/{job['id']}/preview")
    assert fetched.headers["content-type"] == "image/png" and fetched.headers["x-preview-step"] == "12"


def test_events_of_a_cancelled_job_end_with_cancelled(jobs_server):
    job = submit(jobs_server, LONG)
    wait(jobs_server, job["id"], until=lambda j: j["step"] >= 2)
    httpx.delete(f"{jobs_server.url}/v1/jobs/{job['id']}")
    assert read_events(jobs_server, job["id"])[-1][0] == "cancelled"
    assert httpx.get(f"{jobs_server.url}/v1/jobs/{job['id']}/preview").status_code == 400  # none was asked for


def test_a_synchronous_request_whose_client_leaves_is_cancelled(jobs_server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{jobs_server.url}/v1/txt2img", json=LONG, timeout=1.0)
    started = time.monotonic()
    quick = httpx.post(f"{jobs_server.url}/v1/txt2img", json=SHORT, timeout=60)
    waited = time.monotonic() - started
    assert quick.status_code == 200
    assert waited < 2.5, waited  # the abandoned 4 s job did not hold the device to its end
    abandoned = [j for j in httpx.get(f"{jobs_server.url}/v1/jobs").json()["jobs"] if j["total_steps"] == 30]
    assert abandoned[0]["status"] == "cancelled" and abandoned[0]["step"] < 30
    assert "client disconnected" in jobs_server.log()


def test_full_queue_is_429_with_retry_after(jobs_server):
    ids = [submit(jobs_server, LONG)["id"]]
    wait(jobs_server, ids[0], until=lambda j: j["status"] == "running")
    ids += [submit(jobs_server, LONG)["id"], submit(jobs_server, LONG)["id"]]  # SDXL_MAX_QUEUE=2 waiting
    full = httpx.post(f"{jobs_server.url}/v1/jobs", json=SHORT)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["type"] == "queue_full"
    sync_full = httpx.post(f"{jobs_server.url}/v1/generate", json=SHORT)
    assert sync_full.status_code == 429 and "retry-after" in sync_full.headers
    assert httpx.get(f"{jobs_server.url}/v1/system/status").json()["queue_length"] == 2
    for job_id in ids:
        httpx.delete(f"{jobs_server.url}/v1/jobs/{job_id}")


def test_finished_jobs_expire_with_410(jobs_server):
    job = submit(jobs_server, SHORT)
    assert wait(jobs_server, job["id"])[0]["status"] == "succeeded"
    time.sleep(4.5)  # SDXL_JOB_TTL_SECONDS=4
    expired = httpx.get(f"{jobs_server.url}/v1/jobs/{job['id']}")
    assert expired.status_code == 410 and expired.json()["error"]["type"] == "job_expired"
    assert httpx.get(f"{jobs_server.url}/v1/jobs/0123456789abcdef").status_code == 404
