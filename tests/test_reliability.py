"""Faults and attackers: a worker killed mid-job, keys that are not tenants, metrics that would
leak ids, bodies too large to parse, a device thread that must outlive whatever a job does."""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.jobs import JobStatus, MemoryJobQueue
from backends.sdxl_backend.jobs.worker import Device, ParkSeam
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult
from models.catalog import defaults_for
from tests.conftest import GUARD_KEYS
from tests.test_jobs import LONG, SHORT, submit, wait

K1, K2 = GUARD_KEYS[2:]


# --- the device thread, in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model):
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    return Engine(ModelManager([source], select_placement()), "tiny-sdxl")


def test_the_device_thread_outlives_a_cancelled_waiter_and_a_crashing_observer(engine):
    seen = []

    def observer(job):
        seen.append((job.status, job.step))
        if job.status == JobStatus.RUNNING:
            raise RuntimeError("an observer bug")

    jobs = MemoryJobQueue([Device.alone(engine)], on_change=observer)
    jobs.start()
    try:
        first = jobs.submit(engine.prepare(GenerationRequest(prompt="x", steps=2)))
        first.done.cancel()  # a waiter that gave up the way asyncio does: the device must not care
        second = jobs.submit(engine.prepare(GenerationRequest(prompt="y", steps=2)))
        second.done.result(timeout=300)
        assert second.result.images
        assert first.status == JobStatus.SUCCEEDED and jobs.alive
        assert seen.count((JobStatus.RUNNING, 0)) == 2  # both starts told (and each step after)
    finally:
        jobs.close()
    assert not jobs.alive  # close() ends the thread it started


def test_a_delivered_result_and_a_kept_error_hold_nothing_of_the_generation(engine, tmp_path):
    """What a finished job keeps: a delivered result's images are freed (no future holds them),
    and a cancelled job's error has no traceback (whose frames would hold its tensors)."""
    park = tmp_path / "park"  # (the park seam: the job to cancel is held at its first step)
    park.touch()
    jobs = MemoryJobQueue([replace(Device.alone(engine), park=ParkSeam(park))])
    jobs.start()
    try:
        delivered = jobs.submit(engine.prepare(GenerationRequest(prompt="delivered-7f3a", steps=2)))
        delivered.done.result(timeout=300)
        assert delivered.status == JobStatus.SUCCEEDED and delivered.result.images
        jobs.forget_result(delivered)
        gc.collect()
        assert not [
            o for o in gc.get_objects() if isinstance(o, GenerationResult) and o.request.prompt == "delivered-7f3a"
        ]
        cancelled = jobs.submit(engine.prepare(GenerationRequest(prompt="park", width=64, height=64, steps=30)))
        while cancelled.step < 1:
            time.sleep(0.01)
        jobs.cancel(cancelled)
        cancelled.done.result(timeout=300)
        assert cancelled.status == JobStatus.CANCELLED
        assert cancelled.error.__traceback__ is None and cancelled.error.__context__ is None
        again = cancelled.error.copy()
        assert (
            type(again) is type(cancelled.error)
            and again.message == cancelled.error.message
            and again is not cancelled.error
        )
    finally:
        jobs.close()


def test_the_request_timeout_disarms_its_timer_and_answers_504_in_the_error_shape():
    """BentoML's request timeout, as service.py installs it: a finished request leaves no armed
    timer (which would hold the request's context until it fired), and one with no answer in
    time gets the one error shape."""
    import asyncio
    import json

    from backends.api.edge.middleware import TimelyTimeout

    async def quick(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def stuck(scope, receive, send):
        await asyncio.sleep(60)

    async def main() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        answered: list = []
        for _ in range(5):
            await TimelyTimeout(quick, timeout=600)({"type": "http"}, None, lambda m: _append(answered, m))
        armed = [timer for timer in loop._scheduled if not timer.cancelled()]
        assert not armed, armed
        timed_out: list = []
        await TimelyTimeout(stuck, timeout=0.05)({"type": "http"}, None, lambda m: _append(timed_out, m))
        return answered, timed_out

    async def _append(messages, message):
        messages.append(message)

    answered, timed_out = asyncio.run(main())
    assert [m["status"] for m in answered if m["type"] == "http.response.start"] == [200] * 5
    assert timed_out[0]["status"] == 504
    assert json.loads(timed_out[1]["body"])["error"]["message"].startswith("no answer within 0.05 s")


# --- through served processes ------------------------------------------------------------------


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_jobs_belong_to_the_key_that_made_them(guarded):
    job = httpx.post(f"{guarded.url}/v1/jobs", json=SHORT, headers=as_key(K1), timeout=300).json()
    for route in ("", "/events", "/preview"):
        other = httpx.get(f"{guarded.url}/v1/jobs/{job['id']}{route}", headers=as_key(K2), timeout=300)
        assert other.status_code == 404, route  # not 403: the id is not confirmed
    assert httpx.delete(f"{guarded.url}/v1/jobs/{job['id']}", headers=as_key(K2), timeout=300).status_code == 404
    assert job["id"] not in [
        j["id"] for j in httpx.get(f"{guarded.url}/v1/jobs", headers=as_key(K2), timeout=300).json()["jobs"]
    ]
    mine = httpx.get(f"{guarded.url}/v1/jobs/{job['id']}", headers=as_key(K1), timeout=300)
    assert mine.status_code == 200 and mine.json()["id"] == job["id"]


def test_interrupt_stops_only_the_callers_generation(guarded):
    def progress(key: str) -> dict:
        return httpx.get(f"{guarded.url}/sdapi/v1/progress", headers=as_key(key), timeout=300).json()

    with guarded.parked():
        job = httpx.post(f"{guarded.url}/v1/jobs", json=LONG, headers=as_key(K1), timeout=300).json()
        wait(guarded, job["id"], until=lambda state: state["step"] == 1, headers=as_key(K1))
        httpx.post(f"{guarded.url}/sdapi/v1/interrupt", headers=as_key(K2), timeout=300)
        assert progress(K2)["state"]["job_count"] == 0  # K2 sees no job of its own
        seen = progress(K1)["state"]
        assert seen["job_count"] == 1 and seen["interrupted"] is False  # K2's interrupt did not touch it
        httpx.post(f"{guarded.url}/sdapi/v1/interrupt", headers=as_key(K1), timeout=300)
        # (the held job is let go by its stop flag: the seam reads it)
        state, _ = wait(guarded, job["id"], headers=as_key(K1))
    assert state["status"] == "succeeded" and state["step"] == 1  # ended early, with the image as it stood
    # As A1111's does, /progress keeps the flag up after the job's end, until the caller's next job.
    assert progress(K1)["state"]["interrupted"] is True and progress(K1)["state"]["job_count"] == 0
    assert progress(K2)["state"]["interrupted"] is False
    assert wait(guarded, submit(guarded, SHORT, headers=as_key(K1))["id"], headers=as_key(K1))[0]["step"] > 0
    assert progress(K1)["state"]["interrupted"] is False


def test_metrics_and_docs_need_the_key_and_name_routes_not_ids(guarded):
    assert httpx.get(f"{guarded.url}/metrics", timeout=300).status_code == 401
    assert httpx.get(f"{guarded.url}/docs.json", timeout=300).status_code == 401
    job = submit(guarded, SHORT, headers=as_key(K1))
    # Its end, so that its generation is counted (whatever this server ran before).
    assert wait(guarded, job["id"], headers=as_key(K1))[0]["status"] == "succeeded"
    httpx.get(f"{guarded.url}/v1/images/files/not-an-image.png", timeout=300)
    text = httpx.get(f"{guarded.url}/metrics", headers=as_key(K1), timeout=300).text
    assert job["id"] not in text and "not-an-image" not in text
    assert 'route="/v1/jobs/{job_id}"' in text and 'route="/v1/images/files/{image_id}"' in text
    assert 'route="refused",status="401"' in text  # the two requests without a key above
    generations = [line for line in text.splitlines() if line.startswith("sdxl_generations_total{")]
    assert "sdxl_queued_jobs" in text and any(
        all(label in line for label in ('model="tiny-sdxl"', 'outcome="succeeded"', 'device="cpu"'))
        for line in generations
    )
    assert job["id"] not in guarded.log() and K1 not in guarded.log()


def test_a_body_over_the_limit_is_413_before_parsing(guarded):
    big = b'{"prompt": "' + b"x" * 300_000 + b'"}'
    declared = httpx.post(
        f"{guarded.url}/v1/txt2img",
        content=big,
        headers={**as_key(K1), "Content-Type": "application/json"},
        timeout=300,
    )
    assert declared.status_code == 413 and "SDXL_MAX_BODY_BYTES" in declared.json()["error"]["message"]
    chunked = httpx.post(
        f"{guarded.url}/v1/generate",
        content=iter([big[:100_000], big[100_000:]]),
        headers={**as_key(K1), "Content-Type": "application/json"},
        timeout=300,
    )
    assert chunked.status_code == 413
    assert httpx.post(f"{guarded.url}/v1/txt2img", json=SHORT, headers=as_key(K1), timeout=300).status_code == 200


def worker_of(server) -> psutil.Process:
    return next(
        p
        for p in psutil.Process(server.process.pid).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    )


def test_a_worker_killed_mid_job_leaves_jobs_that_say_so(jobs_server):
    server = jobs_server
    with server.parked():
        running = submit(server, {**LONG, "steps": 150})
        queued = submit(server, LONG)
        wait(server, running["id"], until=lambda job: job["step"] == 1)
        worker = worker_of(server)
        worker.kill()  # kill -9
        worker.wait(60)
        server.wait_ready()  # BentoML starts a new worker
    for job_id, was in ((running["id"], "running"), (queued["id"], "queued")):
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=300).json()
        assert job["status"] == "failed", job
        assert job["error"]["message"] == f"failed: the worker restarted while this job was {was}"
    assert wait(server, submit(server, SHORT)["id"])[0]["status"] == "succeeded"


def test_deeply_nested_json_is_a_400_not_a_crash(guarded):
    deep = b'{"prompt": "x", "width": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    for route in ("/v1/txt2img", "/v1/generate", "/sdapi/v1/txt2img"):
        response = httpx.post(
            f"{guarded.url}{route}",
            content=deep,
            timeout=300,
            headers={**as_key(K1), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, (route, response.text[:200])
    assert httpx.post(f"{guarded.url}/v1/txt2img", json=SHORT, headers=as_key(K1), timeout=300).status_code == 200


def test_event_streams_are_capped(guarded):
    server, key = guarded, as_key(K1)
    with server.parked():
        job = submit(server, {**LONG, "steps": 60}, headers=key)
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", headers=key, timeout=300) as first:
            lines = first.iter_lines()  # held: a dropped iterator closes the stream
            assert next(lines) == "event: progress"
            second = httpx.get(f"{server.url}/v1/jobs/{job['id']}/events", headers=key, timeout=300)
            assert second.status_code == 429 and "SDXL_MAX_EVENT_STREAMS" in second.json()["error"]["message"]
            # Another key's slots are its own: its first stream opens while this key's is full.
            others = submit(server, SHORT, headers=as_key(K2))
            with httpx.stream(
                "GET", f"{server.url}/v1/jobs/{others['id']}/events", headers=as_key(K2), timeout=300
            ) as theirs:
                assert theirs.status_code == 200
        httpx.delete(f"{server.url}/v1/jobs/{job['id']}", headers=key, timeout=300)
        wait(server, job["id"], headers=key)
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", headers=key, timeout=300) as again:
        assert again.status_code == 200  # the first stream's place was given back
