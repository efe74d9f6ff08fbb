"""Jobs over plain HTTP: submit, poll, events, previews, cancel, disconnects, timeouts, limits.

A job that must still be running when the test looks (to queue behind it, cancel it, outlast a
timeout) is held after its first step by the server's park seam (`server.parked()`, for jobs
whose prompt says "park"), not made long: the tests hold on a busy CPU and on a fast GPU alike.
Nothing here asserts a duration: the tests check steps reached, order and final states."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import png_bytes
from tests.polling import poll

# Held after its first step within `server.parked()`; outside it, a quick job like any other.
LONG = {"prompt": "a parked one", "width": 64, "height": 64, "steps": 30, "seed": 1}
SHORT = {"prompt": "a quick one", "width": 64, "height": 64, "steps": 2, "seed": 1}


def submit(server, body, headers=None) -> dict:
    response = httpx.post(f"{server.url}/v1/jobs", json=body, headers=headers, timeout=300)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == response.json()["links"]["self"]
    return response.json()


def get(server, job_id: str, headers=None) -> dict:
    return httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers, timeout=300).json()


def wait(
    server,
    job_id: str,
    until=lambda job: job["status"] in ("succeeded", "failed", "cancelled"),
    timeout: float = 600,
    headers=None,
) -> tuple[dict, list[dict]]:
    """Poll until `until`; returns the last state and every state seen."""
    seen: list[dict] = []

    def look() -> dict:
        seen.append(get(server, job_id, headers))
        return seen[-1]

    return poll(look, until, timeout, what=f"job {job_id}"), seen


def test_submit_poll_and_result(jobs_server):
    with jobs_server.parked():
        job = submit(jobs_server, LONG)
        assert job["status"] in ("queued", "running") and job["percent"] == 0.0
        held, before = wait(jobs_server, job["id"], until=lambda j: j["step"] == 1)
    done, after = wait(jobs_server, job["id"])
    assert done["status"] == "succeeded"
    percents = [state["percent"] for state in before + after]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert held["status"] == "running" and held["percent"] == round(100 / 30, 1)  # progress seen in between
    assert held["eta_s"] is not None and held["total_steps"] == 30
    result = done["result"]
    assert result["parameters"]["steps"] == 30 and result["images"][0]["seed"] == 1
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0]["b64_json"])))
    assert image.size == (64, 64)
    listed = httpx.get(f"{jobs_server.url}/v1/jobs", timeout=300).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]


def test_img2img_job_and_bad_body(jobs_server):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    job = submit(jobs_server, {**SHORT, "steps": 4, "image": base64.b64encode(png.getvalue()).decode()})
    done, _ = wait(jobs_server, job["id"])
    assert done["status"] == "succeeded" and done["total_steps"] == 3  # 4 steps x strength 0.75
    for bad, status, param in [
        ({"width": 63}, 400, "width"),
        ({"steps": 100000}, 400, "steps"),
        ({"steps": "many"}, 400, "steps"),
        ({"model": "nope"}, 404, "model"),
    ]:
        refused = httpx.post(f"{jobs_server.url}/v1/jobs", json={**SHORT, **bad}, timeout=300)
        assert refused.status_code == status and refused.json()["error"]["param"] == param, refused.text


def test_a_bad_request_is_refused_at_once_even_behind_a_full_queue(jobs_server):
    with jobs_server.parked():
        ids = [submit(jobs_server, LONG)["id"]]
        wait(jobs_server, ids[0], until=lambda j: j["status"] == "running")
        ids += [submit(jobs_server, LONG)["id"], submit(jobs_server, LONG)["id"]]  # SDXL_MAX_QUEUE=2 waiting
        bad = httpx.post(f"{jobs_server.url}/v1/jobs", json={**SHORT, "width": 63}, timeout=300)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "width"  # not 429, not 202
        assert get(jobs_server, ids[0])["status"] == "running"  # answered while the first still runs
        for job_id in ids:
            httpx.delete(f"{jobs_server.url}/v1/jobs/{job_id}", timeout=300)
        wait(jobs_server, ids[0])


def test_cancel_queued_and_running_jobs_then_the_next_runs(jobs_server):
    with jobs_server.parked():
        running = submit(jobs_server, LONG)
        # Another batch key (steps): were both still queued when the device freed up, a twin of
        # the first would run beside it in one batch, and not be queued any more.
        queued = submit(jobs_server, {**LONG, "steps": 29})
        # Behind the first (and, on a slow machine, behind what an earlier test's cancels left running).
        assert queued["status"] == "queued" and queued["queue_position"] >= 1
        wait(jobs_server, running["id"], until=lambda job: job["step"] == 1)

        cancelled_queued = httpx.delete(f"{jobs_server.url}/v1/jobs/{queued['id']}", timeout=300).json()
        assert cancelled_queued["status"] == "cancelled" and cancelled_queued["elapsed_s"] is None
        step_at_cancel = httpx.post(f"{jobs_server.url}/v1/jobs/{running['id']}/cancel", timeout=300).json()["step"]
        stopped, _ = wait(jobs_server, running["id"])
    assert stopped["status"] == "cancelled"
    assert step_at_cancel == stopped["step"] == 1, stopped["step"]  # stopped where it was, not run on
    # The cancel is recorded after the job was made, and the time it took to free the device reported.
    assert stopped["cancel_requested_at"] > stopped["created"] and isinstance(stopped["cancel_to_free_s"], float)
    assert stopped["error"]["type"] == "cancelled"

    after = submit(jobs_server, SHORT)
    assert wait(jobs_server, after["id"])[0]["status"] == "succeeded"
    never_started = httpx.get(f"{jobs_server.url}/v1/jobs/{queued['id']}", timeout=300)
    assert never_started.status_code == 410 or never_started.json()["step"] == 0  # expired, or seen with no step run


def read_events(server, job_id: str, on_event=None) -> list[tuple[str, dict]]:
    """The job's event stream to its end; `on_event(name, data)` is called as each arrives."""
    events = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", timeout=300) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if on_event is not None:
                    on_event(*events[-1])
    return events


def test_events_stream_progress_previews_and_result(jobs_server):
    with jobs_server.parked():
        job = submit(jobs_server, {**LONG, "width": 256, "height": 256, "steps": 12, "preview_every": 1})
        # Held at its first step until the stream has shown its preview: then let go. (A progress
        # event may read step 1 of the live job a moment before that step's preview is made.)
        events = read_events(
            jobs_server,
            job["id"],
            lambda name, data: (
                name == "preview" and data["step"] == 1 and jobs_server.park_file.unlink(missing_ok=True)
            ),
        )
    names = [name for name, _ in events]
    assert names[-1] == "result" and events[-1][1]["result"]["images"]
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and 1 in steps and max(steps) == 12  # (a fast device may skip some between)
    previews = [data for name, data in events if name == "preview"]
    assert previews and previews[0]["step"] == 1
    preview = Image.open(io.BytesIO(base64.b64decode(previews[-1]["b64_json"])))
    assert preview.size == (32, 32)  # the latent grid: 1/8 of the image
    fetched = httpx.get(f"{jobs_server.url}/v1/jobs/{job['id']}/preview", timeout=300)
    assert fetched.headers["content-type"] == "image/png" and fetched.headers["x-preview-step"] == "12"


def test_events_of_a_cancelled_job_end_with_cancelled(jobs_server):
    with jobs_server.parked():
        job = submit(jobs_server, LONG)
        wait(jobs_server, job["id"], until=lambda j: j["step"] == 1)
        httpx.delete(f"{jobs_server.url}/v1/jobs/{job['id']}", timeout=300)
        assert read_events(jobs_server, job["id"])[-1][0] == "cancelled"
    assert (
        httpx.get(f"{jobs_server.url}/v1/jobs/{job['id']}/preview", timeout=300).status_code == 400
    )  # none was asked for


def test_a_synchronous_request_whose_client_leaves_is_cancelled(jobs_server):
    said_before = jobs_server.log().count("client disconnected")  # (the server's log is the session's)
    left = {**LONG, "steps": 33}  # no other test's job on this server has 33 steps
    with jobs_server.parked(), pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{jobs_server.url}/v1/txt2img", json=left, timeout=1.0)
    # A job, not a synchronous request: this server's 3 s request timeout must not decide it.
    assert wait(jobs_server, submit(jobs_server, SHORT)["id"])[0]["status"] == "succeeded"
    (abandoned,) = [
        j for j in httpx.get(f"{jobs_server.url}/v1/jobs", timeout=300).json()["jobs"] if j["total_steps"] == 33
    ]
    assert abandoned["status"] == "cancelled" and abandoned["step"] < 33  # not run to its end
    assert jobs_server.log().count("client disconnected") == said_before + 1


def test_full_queue_is_429_with_retry_after(jobs_server):
    with jobs_server.parked():
        ids = [submit(jobs_server, LONG)["id"]]
        wait(jobs_server, ids[0], until=lambda j: j["status"] == "running")
        ids += [submit(jobs_server, LONG)["id"], submit(jobs_server, LONG)["id"]]  # SDXL_MAX_QUEUE=2 waiting
        full = httpx.post(f"{jobs_server.url}/v1/jobs", json=SHORT, timeout=300)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["type"] == "queue_full"
        sync_full = httpx.post(f"{jobs_server.url}/v1/generate", json=SHORT, timeout=300)
        assert sync_full.status_code == 429 and "retry-after" in sync_full.headers
        assert httpx.get(f"{jobs_server.url}/v1/system/status", timeout=300).json()["queue_length"] == 2
        for job_id in ids:
            httpx.delete(f"{jobs_server.url}/v1/jobs/{job_id}", timeout=300)
        wait(jobs_server, ids[0])


def test_finished_jobs_expire_with_410(jobs_server):
    job = submit(jobs_server, SHORT)
    assert wait(jobs_server, job["id"])[0]["status"] == "succeeded"
    time.sleep(10.5)  # SDXL_JOB_TTL_SECONDS=10
    expired = httpx.get(f"{jobs_server.url}/v1/jobs/{job['id']}", timeout=300)
    assert expired.status_code == 410 and expired.json()["error"]["type"] == "job_expired"
    assert httpx.get(f"{jobs_server.url}/v1/jobs/0123456789abcdef", timeout=300).status_code == 404


def test_jobs_list_is_paginated(jobs_server):
    # Unfinished jobs (held): finished ones could expire (SDXL_JOB_TTL_SECONDS) on a slow machine.
    with jobs_server.parked():
        ids = [submit(jobs_server, LONG)["id"]]
        wait(jobs_server, ids[0], until=lambda j: j["status"] == "running")
        ids += [submit(jobs_server, LONG)["id"], submit(jobs_server, LONG)["id"]]
        first = httpx.get(f"{jobs_server.url}/v1/jobs", params={"limit": 2}, timeout=300).json()
        assert [j["id"] for j in first["jobs"]] == ids[::-1][:2] and first["next_before"] is not None
        rest = httpx.get(f"{jobs_server.url}/v1/jobs", params={"limit": 2, "before": first["next_before"]}, timeout=300)
        assert next(j["id"] for j in rest.json()["jobs"]) == ids[0]
        assert httpx.get(f"{jobs_server.url}/v1/jobs", params={"limit": 1000}, timeout=300).status_code == 400
        for job_id in ids:
            httpx.delete(f"{jobs_server.url}/v1/jobs/{job_id}", timeout=300)
        wait(jobs_server, ids[0])


def test_a_hang_up_just_before_the_timeout_leaves_the_device_serving(jobs_server):
    """The race that once killed the device thread: the client leaves just before the request
    timeout fires; cancellation and timeout meet on the same job. The next request must run."""
    server = jobs_server
    for _ in range(2):
        with server.parked(), pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/txt2img", json={**LONG, "steps": 60}, timeout=2.6)
    # The device takes the next job (a job has no request timeout, so a busy machine cannot fail this).
    assert wait(server, submit(server, SHORT)["id"])[0]["status"] == "succeeded"
    assert httpx.get(f"{server.url}/readyz", timeout=300).status_code == 200
    assert httpx.get(f"{server.url}/livez", timeout=300).status_code == 200


def test_a_request_past_the_timeout_is_cancelled_with_a_504(jobs_server):
    server = jobs_server
    slow = {**LONG, "steps": 150}  # held past SDXL_TIMEOUT_SECONDS=3
    with server.parked():
        timed_out = httpx.post(f"{server.url}/v1/txt2img", json=slow, timeout=300)
    assert timed_out.status_code == 504, timed_out.text
    assert timed_out.json()["error"]["type"] == "timeout"
    jobs = httpx.get(f"{server.url}/v1/jobs", timeout=300).json()["jobs"]
    abandoned = next(j for j in jobs if j["total_steps"] == 150)
    assert abandoned["status"] == "cancelled" and abandoned["step"] < 150  # the device was freed
    assert wait(server, submit(server, SHORT)["id"])[0]["status"] == "succeeded"


def test_compatible_queued_jobs_run_as_one_batch_and_a_cancelled_one_leaves_it(server):
    """SDXL_MAX_BATCH at its default (4): while a long job holds the device, three compatible
    jobs (other prompts and seeds) and an incompatible one queue up; the three then run in one
    pipeline call, in arrival order before the incompatible one, each with its own seed and
    pixels; one of them cancelled mid-call ends cancelled while the other two succeed."""
    batch = {**SHORT, "steps": 30, "width": 128, "height": 128}
    with server.parked():
        blocker = submit(server, LONG)
        wait(server, blocker["id"], until=lambda job: job["status"] == "running")
        first = submit(server, {**batch, "prompt": "park one", "seed": 11})  # (the call is held at its first step)
        other = submit(server, {**batch, "steps": 29})  # another step count: its own call
        second = submit(server, {**batch, "prompt": "two", "seed": 12, "n": 2})
        third = submit(server, {**batch, "prompt": "three", "seed": 13})
        httpx.delete(f"{server.url}/v1/jobs/{blocker['id']}", timeout=300)
        wait(server, third["id"], until=lambda job: job["status"] == "running")
        assert get(server, first["id"])["status"] == get(server, second["id"])["status"] == "running"
        assert get(server, other["id"])["status"] == "queued"
        httpx.delete(f"{server.url}/v1/jobs/{third['id']}", timeout=300)

    cancelled, _ = wait(server, third["id"])
    done_first, _ = wait(server, first["id"])
    done_second, _ = wait(server, second["id"])
    done_other, _ = wait(server, other["id"])
    assert cancelled["status"] == "cancelled" and cancelled["step"] < 30
    assert done_first["status"] == done_second["status"] == done_other["status"] == "succeeded"
    assert done_first["result"]["batch_images"] == done_second["result"]["batch_images"] == 4
    assert done_other["result"]["batch_images"] == 1
    assert [image["seed"] for image in done_second["result"]["images"]] == [12, 13]
    assert done_first["result"]["parameters"]["prompt"] == "park one"
    # Each job's pixels are those it gets alone (the CPU's batched rounding aside: at most 1 level).
    alone = httpx.post(f"{server.url}/v1/txt2img", json={**batch, "prompt": "park one", "seed": 11}, timeout=300).json()
    assert alone["batch_images"] == 1
    a, b = (
        Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["b64_json"]))).convert("RGB").tobytes()
        for answer in (alone, done_first["result"])
    )
    assert max(abs(x - y) for x, y in zip(a, b)) <= 3


def test_an_upscale_is_a_job_that_waits_its_turn_shows_in_the_list_and_is_cancelled_there(server):
    """/v1/upscale's client waits, but the upscale is a job like any other: queued behind a
    running job, listed by GET /v1/jobs with its kind, and a DELETE there cancels it (its client
    gets the cancellation); the next one runs once the device is free."""
    upscale = {"image": base64.b64encode(png_bytes(40, 30)).decode(), "upscaler": "lanczos", "scale": 2}

    def queued_upscales() -> list[dict]:
        listed = httpx.get(f"{server.url}/v1/jobs", timeout=300).json()["jobs"]
        return [job for job in listed if job["kind"] == "upscale" and job["status"] == "queued"]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with server.parked():
            blocker = submit(server, {**LONG, "prompt": "a parked one, held"})
            wait(server, blocker["id"], until=lambda job: job["step"] == 1)
            first = pool.submit(httpx.post, f"{server.url}/v1/upscale", json=upscale, timeout=300)
            (listed,) = poll(queued_upscales, until=lambda found: len(found) == 1, what="the upscale listed")
            assert listed["queue_position"] >= 1 and listed["result"] is None
            assert httpx.delete(f"{server.url}/v1/jobs/{listed['id']}", timeout=300).json()["status"] == "cancelled"
            refused = first.result()
            assert refused.status_code == 409 and refused.json()["error"]["type"] == "cancelled"
            second = pool.submit(httpx.post, f"{server.url}/v1/upscale", json=upscale, timeout=300)
            poll(queued_upscales, until=lambda found: len(found) == 1, what="the second upscale queued")
            httpx.delete(f"{server.url}/v1/jobs/{blocker['id']}", timeout=300)
        answer = second.result()
    assert answer.status_code == 200 and (answer.json()["width"], answer.json()["height"]) == (80, 60)
    ran = next(
        job for job in httpx.get(f"{server.url}/v1/jobs", timeout=300).json()["jobs"] if job["kind"] == "upscale"
    )
    assert ran["status"] == "succeeded" and ran["device"] == answer.json()["device"]
