"""Webhooks on jobs (backends/api/jobs/webhooks.py), served: a receiver on 127.0.0.1 (allowed by the
setting) gets signed events, verified with the `standardwebhooks` package; failures are retried,
then recorded on the job; a host outside the allow-list is refused at submit with no connection
made (127.0.0.2 is the outsider: tests touch loopback addresses only). Where a name resolves is
a unit test of the address check, with a resolver standing in for DNS."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from backends.api.jobs.webhook_sender import Destinations, WebhookSender
from backends.sdxl_backend.errors import InvalidRequest
from tests.polling import poll
from tests.test_jobs import submit, wait

SECRET = "whsec_" + base64.b64encode(b"a test secret of thirty-two bytes").decode()
SHORT = {"prompt": "a quick one", "width": 64, "height": 64, "steps": 2, "seed": 3}


class Receiver:
    """An HTTP receiver on 127.0.0.1: records every request; `/fail-N` answers 500 N times first,
    `/down` always; `/hang-once` does not answer its first request (until `released`); `/trickle`
    never ends its headers while the sender waits."""

    def __init__(self):
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.failures: dict[str, int] = {}
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((self.path, dict(self.headers), body))
                if self.path == "/trickle":
                    return receiver.trickle(self)
                failed = receiver.failures.get(self.path, 0)
                if self.path == "/hang-once" and failed == 0:
                    receiver.failures[self.path] = 1
                    receiver.released.wait(120)
                    return  # (the connection closes unanswered)
                wanted = 10**6 if self.path == "/down" else int(self.path.split("-")[1]) if "fail-" in self.path else 0
                receiver.failures[self.path] = failed + 1
                self.send_response(500 if failed < wanted else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.trickle_released = threading.Event()  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def trickle(handler: BaseHTTPRequestHandler) -> None:
        """`/trickle`: a status line, then a header a byte every 0.2 s, until the sender hangs
        up or the receiver stops; only then the end of the headers."""
        handler.close_connection = True
        try:
            handler.wfile.write(b"HTTP/1.1 204 No Content\r\nX-Slow: ")
            while not handler.server.trickle_released.wait(0.2):  # type: ignore[attr-defined]
                handler.wfile.write(b"a")
                handler.wfile.flush()
            handler.wfile.write(b"\r\n\r\n")
        except OSError:  # (the sender hung up: what the deadline is for)
            pass

    def stop(self) -> None:
        self.released.set()
        self.server.trickle_released.set()
        self.server.shutdown()

    def events(self, path: str) -> list[dict]:
        return [json.loads(body) for got, _, body in self.received if got == path]


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def hooked(serve_for_module):
    return serve_for_module(
        "webhooks",
        {
            "SDXL_MODELS": "tiny-sdxl",
            "SDXL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1/32",
            "SDXL_WEBHOOK_SECRET": SECRET,
            "SDXL_WEBHOOK_ATTEMPTS": "3",
            "SDXL_WEBHOOK_RETRY_SECONDS": "0.2",
            "SDXL_WEBHOOK_TIMEOUT_SECONDS": "2",
        },
    )


def delivered(server, job_id: str, events: set[str]) -> dict:
    """The job once each of `events` has a delivery outcome on it."""
    return wait(server, job_id, until=lambda job: set(job.get("webhooks") or {}) >= events)[0]


def test_signed_events_when_the_job_starts_and_ends(hooked, receiver):
    hook = {"url": f"{receiver.url}/hook", "events": ["started", "progress", "completed"]}
    job = submit(hooked, {**SHORT, "webhook": hook})
    done = delivered(hooked, job["id"], {"started", "progress", "completed"})
    assert done["webhooks"]["started"] == {"status": "delivered", "attempts": 1}
    assert done["webhooks"]["completed"] == {"status": "delivered", "attempts": 1}
    requests = [(headers, body) for path, headers, body in receiver.received if path == "/hook"]
    verified = [Webhook(SECRET).verify(body, headers) for headers, body in requests]
    told = [event["event"] for event in verified]
    assert told[0] == "started" and told[-1] == "completed" and set(told[1:-1]) == {"progress"}  # in order
    assert all(event["id"] == job["id"] for event in verified)
    assert verified[0]["status"] == "running" and verified[1]["step"] >= 1 and verified[-1]["status"] == "succeeded"
    (image,) = verified[-1]["result"]["images"]
    assert "b64_json" not in image
    assert httpx.get(image["url"], timeout=300).headers["content-type"] == "image/png"  # a link, fetchable
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another secret").decode()).verify(requests[0][1], requests[0][0])


def test_a_failing_receiver_is_tried_again_then_the_job_says_it_failed(hooked, receiver):
    flaky = submit(hooked, {**SHORT, "webhook": {"url": f"{receiver.url}/fail-2"}})
    assert delivered(hooked, flaky["id"], {"completed"})["webhooks"]["completed"] == {
        "status": "delivered",
        "attempts": 3,
    }
    ids = {headers["webhook-id"] for path, headers, _ in receiver.received if path == "/fail-2"}
    assert len(ids) == 1  # one event, retried: the same id, so a receiver can drop repeats
    down = submit(hooked, {**SHORT, "webhook": {"url": f"{receiver.url}/down"}})
    outcome = delivered(hooked, down["id"], {"completed"})["webhooks"]["completed"]
    assert outcome == {"status": "failed", "attempts": 3, "error": "answered 500"}
    assert len(receiver.events("/down")) == 3


def test_a_host_outside_the_list_is_refused_before_any_connection(hooked):
    outsider = socket.socket()
    outsider.bind(("127.0.0.2", 0))
    outsider.listen()
    outsider.settimeout(0.5)
    try:
        url = f"http://127.0.0.2:{outsider.getsockname()[1]}/hook"
        answer = httpx.post(f"{hooked.url}/v1/jobs", json={**SHORT, "webhook": {"url": url}}, timeout=300)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "webhook.url"
        assert "SDXL_WEBHOOK_ALLOWED_HOSTS" in answer.json()["error"]["message"]
        time.sleep(0.5)
        with pytest.raises(TimeoutError):
            outsider.accept()  # nobody came
    finally:
        outsider.close()


def test_without_allowed_hosts_webhooks_are_refused_by_name(server, receiver):
    answer = httpx.post(
        f"{server.url}/v1/jobs", json={**SHORT, "webhook": {"url": f"{receiver.url}/hook"}}, timeout=300
    )
    assert answer.status_code == 400 and "SDXL_WEBHOOK_ALLOWED_HOSTS" in answer.json()["error"]["message"]


def test_where_a_name_resolves_decides_as_much_as_the_name():
    """Mocked DNS (no resolver may be reached from the tests): a listed name that resolves to a
    private, loopback or link-local address is refused unless that address's network is listed."""
    answers = {"hooks.example": ["10.0.0.5"], "public.example": ["93.184.216.34"], "meta.example": ["169.254.169.254"]}
    destinations = Destinations(["hooks.example", "public.example", "meta.example"], lambda host, port: answers[host])
    assert destinations.check("https://public.example/hook") == "93.184.216.34"
    for url in (
        "https://hooks.example/hook",
        "http://meta.example/latest",
        "http://10.0.0.5/hook",
        "ftp://public.example/",
    ):
        with pytest.raises(InvalidRequest):
            destinations.check(url)
    private_listed = Destinations(["hooks.example", "10.0.0.0/8"], lambda host, port: answers[host])
    assert private_listed.check("https://hooks.example/hook") == "10.0.0.5"
    with pytest.raises(InvalidRequest, match="SDXL_WEBHOOK_ALLOWED_HOSTS"):
        Destinations([]).check("https://public.example/hook")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://localhost:99999/hook", "no valid port"),
        ("http://localhost:abc/hook", "no valid port"),
        ("http://localhost:-1/hook", "no valid port"),
        ("http://localhost:0/hook", "no valid port"),
        ("http://user:secret@localhost:8080/hook", "credentials in the URL"),
    ],
)
def test_a_bad_port_or_credentials_in_the_url_is_a_400_naming_it(url, why):
    """(Both were a 500, and user:pass@ went out in the Host header.)"""
    with pytest.raises(InvalidRequest, match=why) as refused:
        Destinations(["localhost"], lambda host, port: ["127.0.0.1"]).check(url)
    assert refused.value.param == "webhook.url"


def test_a_trickling_receiver_is_cut_at_the_deadline_each_time(hooked, receiver):
    """SDXL_WEBHOOK_TIMEOUT_SECONDS bounds the whole attempt: a receiver that sends a byte every
    0.2 s forever (each read well within any read timeout) is cut, and the event is retried."""
    job = submit(hooked, {**SHORT, "webhook": {"url": f"{receiver.url}/trickle"}})
    outcome = delivered(hooked, job["id"], {"completed"})["webhooks"]["completed"]
    assert outcome == {"status": "failed", "attempts": 3, "error": "ReadTimeout"}
    assert len(receiver.events("/trickle")) == 3


def test_a_slow_receiver_holds_up_its_own_keys_lane_and_no_other_key():
    """The sender itself, on loopback: owner A's receiver trickles (and A's next event waits
    behind it, in order); owner B's event to the same receiver is delivered meanwhile."""
    outcomes: dict[str, dict] = {}
    sender = WebhookSender(
        None, Destinations(["127.0.0.1/32"]), 1, 0.1, 600.0, lambda job, _, got: outcomes.update({job: got})
    )
    own = Receiver()
    try:
        sender.send("key-a", "a1", "completed", "msg_a1", f"{own.url}/trickle", lambda: {"n": 1})
        poll(lambda: own.received, what="the trickling delivery")
        sender.send("key-a", "a2", "completed", "msg_a2", f"{own.url}/hook", lambda: {"n": 2})
        sender.send("key-b", "b1", "completed", "msg_b1", f"{own.url}/hook", lambda: {"n": 3})
        poll(lambda: "b1" in outcomes, what="key B's delivery")
        assert (
            outcomes["b1"] == {"status": "delivered", "attempts": 1} and "a1" not in outcomes and "a2" not in outcomes
        )
        own.server.trickle_released.set()  # type: ignore[attr-defined]
        poll(lambda: "a2" in outcomes, what="key A's second event, after its first")
        assert outcomes["a1"]["status"] == outcomes["a2"]["status"] == "delivered"
    finally:
        sender.close()
        own.stop()


def test_the_device_thread_never_holds_an_event_in_the_store_itself():
    """`started` happens on the device thread, between steps: holding it in the job queue (a
    Redis call with a shared queue) is the lane's work, before it delivers."""
    from types import SimpleNamespace

    from backends.api.jobs.webhooks import JobWebhooks
    from backends.sdxl_backend.jobs import JobStatus

    held: list[str] = []
    jobs = SimpleNamespace(hold_webhook=lambda *_: held.append(threading.current_thread().name))
    sender = WebhookSender(None, Destinations(["127.0.0.1/32"]), 1, 0.1, 5.0, lambda *_: None)
    webhooks = JobWebhooks(sender, lambda *_: "", jobs)
    spec = {"url": "http://127.0.0.1:9/hook", "events": ["started"], "images": "url", "base_url": ""}
    job = SimpleNamespace(id="0" * 32, owner=None, webhook=spec, status=JobStatus.RUNNING, step=0)
    try:
        webhooks.changed(job)
        poll(lambda: held, what="the event held")
        assert held == ["sdxl-webhooks"]  # (the lane's thread, not this one)
    finally:
        sender.close()
