"""Replicas sharing one Redis (SDXL_REDIS_URL): real `bentoml serve` processes and a real
`redis-server` on 127.0.0.1. They share one job queue (every generation, synchronous ones too)
and the kept images behind `response_format: "url"`: any replica answers for any job.

Which replica runs a job is found from `/v1/system/status` (`jobs_on_device`). Each fleet has
a Redis database of its own, so the fleets of this module never take each other's jobs."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import anyio
import httpx
import pytest
import redis
from standardwebhooks import Webhook

from tests.conftest import chromium, png_bytes
from tests.polling import poll
from tests.served import TraceCollector
from tests.test_mcp import connected
from tests.test_webhooks import Receiver

URL_REQUEST = {"prompt": "a lighthouse", "size": "64x64", "response_format": "url", "seed": 3}
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"the fleet's webhook secret").decode()
SMALL = {"prompt": "a quick one", "width": 64, "height": 64, "steps": 4, "seed": 5}
# Held running after its first step within `parked()` (the park seam), to be caught and cancelled.
BLOCKER = {"prompt": "a parked one", "width": 64, "height": 64, "steps": 150, "seed": 1}
FINAL = ("succeeded", "failed", "cancelled")
PNG_40x30 = png_bytes(40, 30)


def fleet_env(redis_server, database: int, **more: str) -> dict[str, str]:
    return {
        "SDXL_MODELS": "tiny-sdxl",
        "SDXL_REDIS_URL": f"{redis_server.url[:-2]}/{database}",
        "SDXL_WARMUP": "false",
        # One park file for the fleet: a held job is held on whichever replica runs it.
        "SDXL_TEST_PARK_FILE": str(redis_server.folder / f"park-{database}"),
        **more,
    }


@pytest.fixture(scope="module")
def collector():
    """Where the replicas below export their traces."""
    collector = TraceCollector()
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def replicas(serve_for_module, redis_server, collector):
    env = fleet_env(
        redis_server,
        0,
        SDXL_IMAGE_URL_TTL_SECONDS="8",
        SDXL_MAX_QUEUE="3",
        SDXL_MODEL_ALIASES="sdxl-realism=tiny-sdxl",  # (the id the gallery sends)
        SDXL_WEBHOOK_ALLOWED_HOSTS="127.0.0.1/32",
        SDXL_WEBHOOK_SECRET=WEBHOOK_SECRET,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_BSP_SCHEDULE_DELAY="200",  # (spans exported within 0.2 s, not 5)
    )
    return serve_for_module("replica-a", env), serve_for_module("replica-b", env)


def submit(replica, body) -> dict:
    answer = httpx.post(f"{replica.url}/v1/jobs", json=body, timeout=300)
    assert answer.status_code == 202, answer.text
    return answer.json()


def job(replica, job_id: str) -> dict:
    answer = httpx.get(f"{replica.url}/v1/jobs/{job_id}", timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait(replica, job_id: str, until=lambda state: state["status"] in FINAL, timeout: float = 600) -> dict:
    return poll(lambda: job(replica, job_id), until, timeout, what=f"job {job_id}")


def running(state: dict) -> bool:
    return state["status"] == "running" and state["step"] >= 1


def on_device(replica) -> int:
    return httpx.get(f"{replica.url}/v1/system/status", timeout=300).json()["jobs_on_device"]


def runner_and_other(fleet, job_id: str):
    """The replica whose device runs the job, and another one."""
    wait(fleet[0], job_id, running)
    busy = [replica for replica in fleet if on_device(replica)]
    assert len(busy) == 1, "exactly one replica runs the only job"
    return busy[0], next(replica for replica in fleet if replica is not busy[0])


def cancel(replica, job_id: str) -> None:
    assert httpx.delete(f"{replica.url}/v1/jobs/{job_id}", timeout=300).status_code == 200


def test_a_job_submitted_on_one_replica_is_followed_streamed_and_fetched_on_the_other(replicas):
    a, b = replicas
    submitted = submit(a, {**SMALL, "preview_every": 1})
    done = wait(b, submitted["id"])
    assert done["status"] == "succeeded" and done["step"] == done["total_steps"] == 4
    events = httpx.get(f"{b.url}/v1/jobs/{submitted['id']}/events", timeout=300).text
    assert "event: result" in events and done["result"]["images"][0]["b64_json"] in events
    preview = httpx.get(f"{b.url}/v1/jobs/{submitted['id']}/preview", timeout=300)
    assert preview.status_code == 200 and preview.headers["x-preview-step"] == "4"
    assert submitted["id"] in [listed["id"] for listed in httpx.get(f"{b.url}/v1/jobs", timeout=300).json()["jobs"]]
    # The request travelled through Redis and back (its images as PNG): the pixels are those of
    # the same request answered synchronously.
    direct = httpx.post(f"{a.url}/v1/txt2img", json=SMALL, timeout=300).json()
    assert base64.b64decode(direct["images"][0]["b64_json"]) == base64.b64decode(
        done["result"]["images"][0]["b64_json"]
    )


def test_a_webhook_is_delivered_once_per_event_by_the_replica_that_runs_the_job(replicas):
    with replicas[0].parked():  # (BLOCKER jobs are held after their first step)
        receiver = Receiver()
        try:
            first = submit(replicas[0], BLOCKER)
            runner, other = runner_and_other(replicas, first["id"])
            hooked = submit(
                runner, {**SMALL, "webhook": {"url": f"{receiver.url}/hook", "events": ["started", "completed"]}}
            )
            done = wait(other, hooked["id"], lambda state: set(state.get("webhooks") or {}) == {"started", "completed"})
            assert on_device(runner) == 1  # (still busy with the first: the other replica ran the hooked job)
            events = [Webhook(WEBHOOK_SECRET).verify(body, headers) for _, headers, body in receiver.received]
            assert [event["event"] for event in events] == ["started", "completed"]  # once each, from the runner
            assert done["webhooks"]["completed"]["status"] == "delivered" and events[1]["status"] == "succeeded"
            assert httpx.get(events[1]["result"]["images"][0]["url"], timeout=300).status_code == 200
        finally:
            receiver.stop()
            cancel(replicas[0], first["id"])


def test_a_job_made_through_mcp_is_followed_by_get_job_on_the_other_replica(replicas):
    a, b = replicas

    async def main():
        async with connected(a) as on_a:
            queued = await on_a.call_tool("generate_image", {**SMALL, "wait": False})
        job_id = queued.structured_content["job_id"]
        async with connected(b) as on_b:
            with anyio.fail_after(300):
                while (state := await on_b.call_tool("get_job", {"job_id": job_id})).structured_content[
                    "status"
                ] != "succeeded":
                    assert not state.is_error and state.structured_content["status"] in ("queued", "running")
                    await anyio.sleep(0.2)
        return state

    done = anyio.run(main)
    url = done.structured_content["images"][0]["url"]
    assert url.startswith(b.url)
    assert httpx.get(url, timeout=300).headers["content-type"] == "image/png"
    assert httpx.get(url.replace(b.url, a.url), timeout=300).status_code == 200  # (kept in Redis: either serves it)


def test_every_metric_the_grafana_dashboard_reads_is_served(replicas):
    """deploy/grafana/sdxl.json queries only metrics the replicas export (after a generation,
    which runs on either: their /metrics together)."""
    httpx.post(f"{replicas[0].url}/v1/txt2img", json=SMALL, timeout=300).raise_for_status()
    served = {
        line.split("{")[0].split(" ")[0]
        for replica in replicas
        for line in httpx.get(f"{replica.url}/metrics", timeout=300).text.splitlines()
        if line and not line.startswith("#")
    }
    dashboard = json.loads((Path(__file__).parent.parent / "deploy/grafana/sdxl.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]]
    queried = {name for query in queries for name in re.findall(r"\bsdxl_[a-z_]+", query)}
    assert len(queried) >= 12 and queried <= served, queried - served


def test_the_fleet_page_shows_both_replicas_their_model_and_the_queue_filling_and_draining(replicas, tmp_path):
    """/ui/fleet in headless Chromium, on one replica: both replicas (their cards come through
    Redis), each running a long job on tiny-sdxl, two jobs waiting, then none once the long ones
    are cancelled; at 1280 and 375 px, with no console error."""
    with replicas[0].parked():  # (BLOCKER jobs are held after their first step)
        first = submit(replicas[0], BLOCKER)["id"]
        _runner, other = runner_and_other(replicas, first)
        second = submit(replicas[0], BLOCKER)["id"]
        wait(other, second, running)
        waiting = [submit(replicas[0], SMALL)["id"] for _ in range(2)]
        pages = []
        with chromium() as browser:  # (closed, and its contexts, before the next test runs a loop)
            for width in (1280, 375):
                context = browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
                page = context.new_page()
                page.set_default_timeout(120_000)
                page.console_errors = []
                page.on(
                    "console",
                    lambda message, page=page: message.type == "error" and page.console_errors.append(message.text),
                )
                page.on("pageerror", lambda error, page=page: page.console_errors.append(str(error)))
                page.goto(f"{replicas[0].url}/ui/fleet")
                pages.append(page)
                page.wait_for_function(
                    "document.querySelectorAll('.replica').length === 2 && "
                    "document.querySelectorAll('.replica .running').length === 2 && "
                    "document.getElementById('queue-length').textContent === '2'"
                )
                cards = page.locator(".replica").all_inner_texts()
                assert all("tiny-sdxl" in card and "running tiny-sdxl: step" in card for card in cards), cards
                assert sum("answering this page" in card for card in cards) == 1
                assert page.evaluate("document.documentElement.scrollWidth") <= width  # (no sideways scrolling)
                page.screenshot(path=tmp_path / f"fleet-{width}.png", full_page=True)
            cancel(replicas[0], first)
            cancel(replicas[0], second)
            for job_id in waiting:
                wait(replicas[0], job_id)
            for page in pages:
                page.wait_for_function(
                    "document.getElementById('queue-length').textContent === '0' && "
                    "document.querySelectorAll('.replica .idle').length === 2"
                )
                assert page.console_errors == []


def test_a_jobs_trace_goes_on_on_the_replica_that_runs_it(replicas, collector):
    """A job submitted to the busy replica runs on the other: its trace holds the submit's HTTP
    span and `validate` from the first, and `job` (queue wait, model load or not, denoise,
    encode, in that order) from the second, under the same HTTP span."""
    with replicas[0].parked():  # (BLOCKER jobs are held after their first step)
        first = submit(replicas[0], BLOCKER)["id"]
        runner, other = runner_and_other(replicas, first)
        since = time.time_ns()  # (the collector also holds the spans of the module's earlier jobs)
        try:
            job_id = submit(runner, SMALL)["id"]
            assert wait(other, job_id)["status"] == "succeeded"
        finally:
            cancel(replicas[0], first)
        names = {
            replica.url: httpx.get(f"{replica.url}/v1/system/fleet", timeout=300).json()["replicas"][0]["replica"]
            for replica in replicas
        }

        def exported() -> tuple[dict, dict] | None:
            """This job's span from the replica that ran it, and its trace's spans by name, once
            every one the test reads has come (each process exports in its own batches)."""
            jobs = [
                s
                for s in collector.spans
                if s["name"] == "job" and s["attributes"]["sdxl.replica"] == names[other.url] and s["start"] >= since
            ]
            if not jobs:
                return None
            trace = {span["name"]: span for span in collector.spans if span["trace_id"] == jobs[-1]["trace_id"]}
            return (jobs[-1], trace) if {"validate", "queue wait", "denoise", "encode"} <= trace.keys() else None

        job_span, trace = poll(exported, lambda found: found is not None, 60, 0.2, "the job's spans, all exported")
        assert trace["validate"]["attributes"]["sdxl.replica"] == names[runner.url]
        assert trace["validate"]["parent_span_id"] == job_span["parent_span_id"]  # the submit's HTTP span
        assert job_span["parent_span_id"] in {span["span_id"] for span in trace.values()}
        parts = [trace[name] for name in ("queue wait", "denoise", "encode")]
        assert all(part["parent_span_id"] == job_span["span_id"] for part in parts)
        assert [part["start"] for part in parts] == sorted(part["start"] for part in parts)
        assert job_span["start"] <= parts[0]["start"] and parts[-1]["end"] <= job_span["end"]
        assert "a quick one" not in str(collector.spans)  # (no prompt in any span)
        poll(
            lambda: [s for s in collector.spans if s["name"] == "GET /v1/jobs/{job_id}" and s["start"] >= since],
            timeout=60,
            what="the polls' spans, named by route template",
        )
        assert job_id not in str(collector.spans)  # (no id in any span's name or attributes)


def test_img2img_travels_with_its_input_image(replicas):
    a, b = replicas
    made = httpx.post(f"{a.url}/v1/txt2img", json=SMALL, timeout=300).json()["images"][0]["b64_json"]
    body = {**SMALL, "image": made, "strength": 0.5}
    submitted = submit(b, body)
    done = wait(a, submitted["id"])
    assert done["status"] == "succeeded" and done["result"]["parameters"]["strength"] == 0.5
    direct = httpx.post(f"{a.url}/v1/img2img", json=body, timeout=300).json()
    assert direct["images"][0]["b64_json"] == done["result"]["images"][0]["b64_json"]


def test_real_clients_on_their_defaults_through_the_shared_queue(replicas):
    """Every generation goes through Redis now: the gallery's exact request, the openai package,
    webuiapi and BentoML's own client work unchanged, and a link the openai client got from one
    replica opens on the other."""
    import bentoml
    import openai
    import webuiapi

    from tests.test_client_dialects import gallery_image, post_raw

    a, b = replicas
    gallery = post_raw(b, "/v1/generate", b'{"prompt":"x","model":"sdxl-realism","width":64,"height":64}')
    assert gallery.status_code == 200, gallery.text
    assert gallery_image(gallery.json()).size == (64, 64) and gallery.json()["images"][0] == gallery.json()["image"]
    result = openai.OpenAI(base_url=f"{a.url}/v1", api_key="unused", max_retries=0).images.generate(
        model="tiny-sdxl", prompt="a lighthouse", size="64x64", response_format="url"
    )
    fetched = httpx.get(f"{b.url}{urlparse(result.data[0].url).path}", timeout=300)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    made = webuiapi.WebUIApi(baseurl=f"{b.url}/sdapi/v1", steps=4).txt2img(prompt="a misty forest", seed=11)
    assert made.image.size == (512, 512) and made.info["all_seeds"] == [11]
    with bentoml.SyncHTTPClient(a.url, timeout=300) as client:
        answer = client.txt2img(prompt="a red fox", width=64, height=64, steps=4, seed=7)
    assert answer["images"][0]["seed"] == 7


def test_a_cancel_sent_to_one_replica_stops_the_job_running_on_the_other(replicas):
    with replicas[0].parked():  # (BLOCKER jobs are held after their first step)
        submitted = submit(replicas[0], BLOCKER)
        runner, other = runner_and_other(replicas, submitted["id"])
        cancel(other, submitted["id"])
        done = wait(other, submitted["id"])
        assert done["status"] == "cancelled" and done["step"] < done["total_steps"]
        assert done["cancel_to_free_s"] is not None
        assert on_device(runner) == 0


def test_an_a1111_interrupt_sent_to_one_replica_ends_the_job_running_on_the_other_with_its_image(replicas):
    with replicas[0].parked():  # (BLOCKER jobs are held after their first step)
        submitted = submit(replicas[0], BLOCKER)
        runner, other = runner_and_other(replicas, submitted["id"])
        progress = httpx.get(f"{other.url}/sdapi/v1/progress", timeout=300).json()
        assert progress["state"]["sampling_steps"] == BLOCKER["steps"] and progress["state"]["sampling_step"] >= 1
        assert httpx.post(f"{other.url}/sdapi/v1/interrupt", timeout=300).status_code == 200
        done = wait(runner, submitted["id"])
        assert done["status"] == "succeeded" and done["step"] < done["total_steps"] and done["result"]["images"]


def test_a_synchronous_client_is_answered_when_its_job_ran_on_the_other_replica(replicas):
    with replicas[0].parked():  # (BLOCKER jobs are held after their first step)
        submitted = submit(replicas[0], BLOCKER)
        runner, other = runner_and_other(replicas, submitted["id"])
        try:
            answer = httpx.post(f"{runner.url}/v1/txt2img", json=SMALL, timeout=300)
            assert answer.status_code == 200 and answer.json()["images"]
            # The runner's device was busy all along: the other replica made the image.
            assert job(other, submitted["id"])["status"] == "running" and on_device(runner) == 1
        finally:
            cancel(runner, submitted["id"])


def test_an_upscale_is_a_job_of_the_fleet_run_by_the_replica_that_is_free(replicas):
    """An upscale sent to a replica whose device is busy runs on the other one, and either
    replica lists it among the jobs."""
    upscale = {"image": base64.b64encode(PNG_40x30).decode(), "upscaler": "lanczos", "scale": 2}
    with replicas[0].parked():
        submitted = submit(replicas[0], BLOCKER)
        runner, other = runner_and_other(replicas, submitted["id"])
        try:
            answer = httpx.post(f"{runner.url}/v1/upscale", json=upscale, timeout=300)
            assert answer.status_code == 200 and (answer.json()["width"], answer.json()["height"]) == (80, 60)
            assert job(other, submitted["id"])["status"] == "running" and on_device(runner) == 1
        finally:
            cancel(runner, submitted["id"])
    listed = httpx.get(f"{runner.url}/v1/jobs", timeout=300).json()["jobs"]
    assert [entry["status"] for entry in listed if entry["kind"] == "upscale"][:1] == ["succeeded"]


def test_the_queue_and_its_bound_are_the_fleets(replicas):
    with replicas[0].parked():  # (BLOCKER jobs are held after their first step)
        a, b = replicas
        blockers = [submit(a, BLOCKER)["id"], submit(b, BLOCKER)["id"]]
        queued = []
        try:
            for blocker in blockers:
                wait(a, blocker, running)
            queued = [submit(replica, SMALL)["id"] for replica in (a, b, a)]  # SDXL_MAX_QUEUE=3
            assert [job(other, job_id)["queue_position"] for other, job_id in zip((b, a, b), queued)] == [1, 2, 3]
            for replica in (a, b):
                refused = httpx.post(f"{replica.url}/v1/jobs", json=SMALL, timeout=300)
                assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            metrics = httpx.get(f"{b.url}/metrics", timeout=300).text
            assert "sdxl_queued_jobs 3.0" in metrics and "sdxl_running_jobs 2.0" in metrics
            # A cancelled queued job leaves the line: those behind it move up, on every replica.
            cancel(b, queued[0])
            assert job(a, queued[0])["status"] == "cancelled" and job(b, queued[2])["queue_position"] == 2
        finally:
            for job_id in blockers:
                cancel(a, job_id)
        assert all(wait(b, job_id)["status"] == "cancelled" for job_id in blockers)
        # The first device free takes the two compatible jobs left as one batch (SDXL_MAX_BATCH=4).
        results = [wait(a, job_id)["result"] for job_id in queued[1:]]
        assert [result["batch_images"] for result in results] == [2, 2]


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


def image_path(replica, body=URL_REQUEST) -> str:
    answer = httpx.post(f"{replica.url}/v1/images/generations", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    return urlparse(answer.json()["data"][0]["url"]).path


def test_redis_out_of_reach_is_a_quick_503_and_the_replicas_recover(replicas, redis_server):
    a, b = replicas
    redis_server.stop()
    try:
        for refused in (
            httpx.post(f"{a.url}/v1/images/generations", json=URL_REQUEST, timeout=300),
            httpx.post(f"{b.url}/v1/txt2img", json=SMALL, timeout=300),
            httpx.post(f"{a.url}/v1/jobs", json=SMALL, timeout=300),
            httpx.get(f"{b.url}/v1/jobs", timeout=300),
            httpx.get(f"{b.url}/v1/images/files/any.png", timeout=300),
        ):
            assert refused.status_code == 503, refused.text
            assert "the shared store (Redis, SDXL_REDIS_URL) cannot be reached" in refused.json()["error"]["message"]
        assert httpx.get(f"{b.url}/health", timeout=300).status_code == 200  # the rest still serves
        assert httpx.get(f"{a.url}/metrics", timeout=300).status_code == 200
    finally:
        redis_server.start()  # (empty: this Redis keeps nothing on disk)
    path = image_path(a)
    assert httpx.get(f"{b.url}{path}", timeout=300).status_code == 200
    assert httpx.post(f"{b.url}/v1/txt2img", json=SMALL, timeout=300).status_code == 200
    assert wait(a, submit(b, SMALL)["id"])["status"] == "succeeded"


@pytest.mark.long
def test_a_killed_replicas_job_is_finished_by_another_and_queued_jobs_outlive_every_replica(serve, redis_server):
    """kill -9 of the replica running a job: another replica resumes it once the dead one's
    heartbeat lapses. Then the last replica is stopped (its running job handed back, the queued
    one left queued) and a new one, started later, finishes both."""
    env = fleet_env(redis_server, 1)
    fleet = [serve("fleet-c", env), serve("fleet-d", env)]
    with fleet[0].parked():  # (held on its runner until the kill)
        submitted = submit(fleet[0], {**BLOCKER, "steps": 30, "seed": 2})
        runner, survivor = runner_and_other(fleet, submitted["id"])
        runner.kill()
    done = wait(survivor, submitted["id"])
    assert done["status"] == "succeeded" and done["step"] == done["total_steps"] == 30
    assert done["result"]["images"][0]["seed"] == 2

    with survivor.parked():  # (held on the survivor until it stops, then on the next replica)
        handed_back, waiting = submit(survivor, BLOCKER)["id"], submit(survivor, SMALL)["id"]
        wait(survivor, handed_back, running)
        survivor.stop()
        store = redis.Redis.from_url(env["SDXL_REDIS_URL"])
        assert store.lrange("sdxl:jobs:queue", 0, -1) == [handed_back.encode(), waiting.encode()]
        assert store.hget(f"sdxl:jobs:job:{handed_back}", "status") == b"queued"
        later = serve("fleet-e", env)
        assert wait(later, handed_back, running)  # it runs again, from its start, on the new replica
        cancel(later, handed_back)
    assert wait(later, waiting)["status"] == "succeeded"


@pytest.mark.long
def test_a_webhook_in_flight_when_its_replica_is_killed_is_delivered_by_another(serve, redis_server):
    """kill -9 of the replica delivering a `completed` event (its receiver has the request and
    has not answered): the next replica claims the held event once the dead one's heartbeat
    lapses and delivers it again, with the same webhook-id."""
    env = fleet_env(redis_server, 5, SDXL_WEBHOOK_ALLOWED_HOSTS="127.0.0.1/32", SDXL_WEBHOOK_SECRET=WEBHOOK_SECRET)
    receiver = Receiver()
    try:
        deliverer = serve("fleet-f", env)
        hooked = {**SMALL, "webhook": {"url": f"{receiver.url}/hang-once", "events": ["completed"]}}
        job_id = submit(deliverer, hooked)["id"]
        poll(lambda: receiver.received, timeout=300, every=0.1, what="the delivery, in flight and unanswered")
        deliverer.kill()
        successor = serve("fleet-g", env)
        done = wait(successor, job_id, lambda state: "completed" in (state.get("webhooks") or {}))
        assert done["webhooks"]["completed"] == {"status": "delivered", "attempts": 1}
        assert [path for path, _, _ in receiver.received] == ["/hang-once", "/hang-once"]
        (_, first, body), (_, again, _) = receiver.received
        assert first["webhook-id"] == again["webhook-id"]  # one event, delivered at least once
        event = Webhook(WEBHOOK_SECRET).verify(body, first)
        assert event["event"] == "completed" and event["status"] == "succeeded" and event["id"] == job_id
        store = redis.Redis.from_url(env["SDXL_REDIS_URL"])
        assert store.hlen("sdxl:jobs:webhooks") == 0  # the hold let go once delivered
    finally:
        receiver.stop()


def queue_on(store, tiny_model, served_as: str = "tiny-sdxl"):
    """A shared queue on the tiny engine (not served), as a replica serving tiny-sdxl under `served_as` has."""
    from backends.sdxl_backend.device import select_placement
    from backends.sdxl_backend.generation.engine import Engine
    from backends.sdxl_backend.jobs.redis_queue import SharedJobQueue
    from backends.sdxl_backend.jobs.worker import Device
    from backends.sdxl_backend.models.manager import ModelManager
    from backends.sdxl_backend.models.records import ModelSource
    from models.catalog import defaults_for

    source = ModelSource(served_as, Path(tiny_model.path), defaults_for("tiny-sdxl"))
    engine = Engine(ModelManager([source], select_placement()), served_as)
    return engine, SharedJobQueue([Device.alone(engine)], store)


def wait_final(queue, *jobs) -> list:
    """The jobs once all are final."""
    return poll(lambda: [queue.get(job.id) for job in jobs], lambda got: all(s.status.final for s in got), every=0.1)


def test_a_job_left_running_by_a_dead_replica_is_requeued_and_fails_after_the_last_attempt(tiny_model, redis_server):
    """What a replica that took two jobs and died leaves in Redis (the jobs running under a name
    whose heartbeat is gone), found by a live replica's queue."""
    from backends.sdxl_backend.jobs.redis_queue.heartbeat import MAX_ATTEMPTS
    from backends.sdxl_backend.protocol import GenerationRequest

    store = redis.Redis.from_url(fleet_env(redis_server, 2)["SDXL_REDIS_URL"])
    engine, queue = queue_on(store, tiny_model)
    again, given_up = (queue.submit(engine.prepare(GenerationRequest(**SMALL))) for _ in range(2))
    for orphan, attempts in ((again, 1), (given_up, MAX_ATTEMPTS)):
        store.lrem("sdxl:jobs:queue", 1, orphan.id)
        store.hset(f"sdxl:jobs:job:{orphan.id}", mapping={"status": "running", "replica": "dead", "attempts": attempts})
        store.hset("sdxl:jobs:running", orphan.id, "dead")
    queue.start()
    try:
        again, given_up = wait_final(queue, again, given_up)
        assert again.status == "succeeded" and again.result.images
        assert given_up.status == "failed" and f"stopped ({MAX_ATTEMPTS} times)" in given_up.error.message
        assert store.hlen("sdxl:jobs:running") == 0
    finally:
        queue.close()


def test_a_webhook_event_held_by_a_replica_that_stopped_is_claimed_once_by_a_live_one(tiny_model, redis_server):
    """The holds a dead replica left (its heartbeat gone), a live one's and a gone job's, as
    Redis has them; a live replica's queue claims only the dead one's, once, and the gone
    job's is let go."""
    from backends.sdxl_backend.protocol import GenerationRequest

    store = redis.Redis.from_url(fleet_env(redis_server, 6)["SDXL_REDIS_URL"])
    store.flushdb()
    engine, queue = queue_on(store, tiny_model)
    spec = {"url": "http://127.0.0.1:9/hook", "events": ["started", "completed"], "images": "url", "base_url": "x"}
    job = queue.submit(engine.prepare(GenerationRequest(**SMALL)), None, None, spec)
    holds = {
        f"{job.id} completed": {"replica": "dead", "message_id": "msg_dead"},
        f"{job.id} started": {"replica": "alive", "message_id": "msg_alive"},
        "gone-job completed": {"replica": "dead", "message_id": "msg_gone"},
    }
    store.hset("sdxl:jobs:webhooks", mapping={field: json.dumps(hold) for field, hold in holds.items()})
    store.set("sdxl:jobs:replica:alive", 1, ex=60)
    store.set(f"sdxl:jobs:replica:{queue.replica}", 1, ex=60)
    [(claimed, event, message_id)] = queue.orphaned_webhooks()
    assert (claimed.id, claimed.webhook, event, message_id) == (job.id, spec, "completed", "msg_dead")
    assert queue.orphaned_webhooks() == []  # claimed once: its holder is this live replica now
    assert json.loads(store.hget("sdxl:jobs:webhooks", f"{job.id} completed"))["replica"] == queue.replica
    queue.record_webhook(job.id, "completed", {"status": "delivered", "attempts": 1})
    assert store.hkeys("sdxl:jobs:webhooks") == [f"{job.id} started".encode()]  # delivered: let go; gone: dropped


def test_a_replica_that_does_not_serve_a_jobs_model_fails_the_job_saying_so(tiny_model, redis_server):
    """Replicas should serve the same models; when one does not, the job it takes fails with the
    model's name, never stays taken."""
    from backends.sdxl_backend.protocol import GenerationRequest

    store = redis.Redis.from_url(fleet_env(redis_server, 3)["SDXL_REDIS_URL"])
    store.flushdb()
    engine, submitter = queue_on(store, tiny_model)
    job = submitter.submit(engine.prepare(GenerationRequest(**SMALL)))  # (this replica's device never starts)
    _, other = queue_on(store, tiny_model, served_as="another-model")
    other.start()
    try:
        (failed,) = wait_final(other, job)
        assert failed.status == "failed" and "model 'tiny-sdxl' is not available" in failed.error.message
        assert failed.error.param == "model" and store.hlen("sdxl:jobs:running") == 0
    finally:
        other.close()


def test_a_waiter_follows_a_job_through_published_changes_not_by_reading_it_in_a_loop(
    tiny_model, redis_server, monkeypatch
):
    """Each change of a job (taken, each step, finished) is published; a request waiting on it
    reads it when a notice comes. With the fallback read set to ten minutes, every wait below
    ends through a notice (one that ended without a change would be the 5-minute guard)."""
    import asyncio

    from backends.sdxl_backend.jobs.redis_queue import feed, keys
    from backends.sdxl_backend.protocol import GenerationRequest

    monkeypatch.setattr(feed, "FALLBACK_S", 600)
    store = redis.Redis.from_url(fleet_env(redis_server, 4)["SDXL_REDIS_URL"])
    listener = store.pubsub()
    listener.subscribe(keys.CHANGES)
    assert listener.get_message(timeout=30)["type"] == "subscribe"
    engine, queue = queue_on(store, tiny_model)
    queue.start()
    try:
        job = queue.submit(engine.prepare(GenerationRequest(**{**SMALL, "steps": 12})))

        async def follow():
            current, versions = job, []
            while not current.status.final:
                before = current.version
                current = await queue.changed(current, before, 300)
                assert current.version > before, f"a wait ended without a change, at {current.status} {current.step}"
                versions.append(current.version)
            return current, versions

        final, versions = asyncio.run(follow())
        assert final.status == "succeeded" and final.result.images and versions == sorted(versions)
        notices = []
        while (notice := listener.get_message(timeout=1)) is not None:
            notices.append(notice["data"].decode())
        ours = [notice for notice in notices if notice.startswith(job.id)]
        assert ours == [job.id] * (1 + 12) + [f"{job.id} final"]  # taken, each step, finished
    finally:
        queue.close()
        listener.close()


def test_a_callers_a1111_options_and_default_model_are_the_same_on_every_replica(replicas):
    a, b = replicas
    changed = httpx.post(
        f"{a.url}/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl-realism", "jpeg_quality": 61}, timeout=300
    )
    assert changed.status_code == 200, changed.text
    try:
        seen = httpx.get(f"{b.url}/sdapi/v1/options", timeout=300).json()
        assert (seen["sd_model_checkpoint"], seen["jpeg_quality"]) == ("sdxl-realism", 61)
        made = httpx.post(f"{b.url}/v1/generate", json={**SMALL, "steps": 1}, timeout=300).json()
        assert made["stats"]["model"] == "tiny-sdxl"  # (sdxl-realism is its alias here)
    finally:
        httpx.post(f"{a.url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"}, timeout=300)


def test_a_job_record_broken_in_redis_is_left_out_and_the_listing_answers_and_taken_it_fails(
    tiny_model, redis_server, caplog
):
    """A record broken by hand or by a bug: listings leave it out, and the replica that takes it
    fails it, never leaving it taken (in `running`) for good."""
    from backends.sdxl_backend.protocol import GenerationRequest

    store = redis.Redis.from_url(fleet_env(redis_server, 9)["SDXL_REDIS_URL"])
    store.flushdb()
    engine, queue = queue_on(store, tiny_model)
    good = queue.submit(engine.prepare(GenerationRequest(**SMALL)))
    broken = queue.submit(engine.prepare(GenerationRequest(**SMALL)))
    store.hset(f"sdxl:jobs:job:{broken.id}", mapping={"created": "yesterday", "images": "many", "request": "{"})
    try:
        listed = [job.id for job in queue.recent(10)]
        assert good.id in listed and broken.id not in listed
        assert queue.get(good.id).id == good.id
        assert "could not be read" in caplog.text and broken.id not in caplog.text
        queue.start()
        (done,) = wait_final(queue, good)
        poll(lambda: store.hget(f"sdxl:jobs:job:{broken.id}", "status"), lambda status: status == b"failed")
        assert done.status == "succeeded" and store.hlen("sdxl:jobs:running") == 0
    finally:
        queue.close()


def test_a_comfyui_prompt_queued_on_one_replica_is_followed_read_and_viewed_on_the_other(replicas):
    """ComfyUI's socket, history and /view work from any replica: the prompt's record is in
    Redis with its job; a socket on the other replica finds it within a second."""
    import asyncio

    import websockets

    from tests.comfyui_workflows import txt2img

    a, b = replicas

    async def follow() -> tuple[str, list[str]]:
        async with websockets.connect(f"ws://127.0.0.1:{b.port}/ws?clientId=fleet-client") as socket:
            async with httpx.AsyncClient(timeout=300) as http:
                queued = await http.post(
                    f"{a.url}/prompt", json={"prompt": txt2img("a fleet"), "client_id": "fleet-client"}
                )
            assert queued.status_code == 200, queued.text
            prompt_id, kinds = queued.json()["prompt_id"], []
            while True:
                event = json.loads(await asyncio.wait_for(socket.recv(), 300))
                kinds.append(event["type"])
                if event["type"] == "executing" and event["data"]["node"] is None:
                    assert event["data"]["prompt_id"] == prompt_id
                    return prompt_id, kinds

    prompt_id, kinds = asyncio.run(follow())
    assert {"execution_start", "executed", "execution_success"} <= set(kinds)
    entry = httpx.get(f"{b.url}/history/{prompt_id}", timeout=60).json()[prompt_id]
    image = entry["outputs"]["9"]["images"][0]
    assert httpx.get(f"{b.url}/view", params=image, timeout=60).headers["content-type"] == "image/png"
