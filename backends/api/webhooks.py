"""Webhooks on jobs: `POST /v1/jobs` with `webhook: {url, events}` has the server call `url`
when the job starts, as it progresses (a step, at most once a second) and when it ends, so an
automation need not poll.

- Signed the Standard Webhooks way (the `standardwebhooks` package): `webhook-id` (one per
  event: a receiver drops a repeat), `webhook-timestamp`, `webhook-signature` (HMAC-SHA256 with
  `SDXL_WEBHOOK_SECRET`). The body is the job's answer (`GET /v1/jobs/{id}`) and its `event`;
  the images as links to kept images (`/v1/images/files/...`), or base64 when asked.
- Delivered at least once: a 2xx ends it; anything else (or no answer within 10 s) is tried
  again after 1, 2, 4... x `SDXL_WEBHOOK_RETRY_SECONDS`, `SDXL_WEBHOOK_ATTEMPTS` times in all;
  then the job records the failure (`webhooks` in its answer). A progress event is sent once
  (the next one supersedes it). Sender threads deliver, so the device never waits on a
  receiver; one job's events go through one of them, in order, and a slow receiver holds up
  only the jobs that share its thread. With a shared queue the replica that runs the job
  delivers, and holds each `started` and `completed` event in Redis until it is delivered or
  given up: when that replica dies first (kill -9, a lost node), another one claims the event
  once the dead one's heartbeat lapses and delivers it again, with the same `webhook-id`.
- Where a webhook may go (SSRF): only to the hosts of `SDXL_WEBHOOK_ALLOWED_HOSTS` (exact names,
  or addresses in listed CIDRs; empty: webhooks are refused, 400 naming the setting); a name
  that resolves to a private, loopback or link-local address is refused unless that address is
  in a listed CIDR. Checked at submit (a refused URL is a 400, no connection made) and again at
  each delivery, after DNS; a plain-http delivery connects to the address it checked (no second
  lookup to rebind); redirects are not followed.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, Field

from backends.api.answers import job_body
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.jobs import Job, JobQueue, JobStatus

logger = logging.getLogger("sdxl_backend")
WebhookEvent = Literal["started", "progress", "completed"]  # (jobs/job.py's WEBHOOK_EVENTS)
TIMEOUT_S = 10.0
SENDERS = 4  # threads delivering; a job's events all go through the same one
PROGRESS_EVERY_S = 1.0  # a webhook hears of a job's steps at most this often
TAKEOVER_EVERY_S = 2.0  # how often the events held by replicas that stopped are looked for
Resolver = Callable[[str, int], list[str]]


class WebhookSpec(BaseModel):
    url: str = Field(description="Where to POST each event (http or https, a host SDXL_WEBHOOK_ALLOWED_HOSTS lists).")
    events: list[WebhookEvent] = Field(
        ["completed"], min_length=1, description="Any of 'started', 'progress' (at most once a second), 'completed'."
    )
    images: Literal["url", "b64_json"] = Field("url", description="The result's images as links, or base64.")


def resolve(host: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


class Destinations:
    """`SDXL_WEBHOOK_ALLOWED_HOSTS`: where webhooks may go."""

    def __init__(self, allowed: list[str], resolver: Resolver = resolve):
        self.names = {entry.lower() for entry in allowed if not _is_network(entry)}
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in allowed if _is_network(entry)]
        self.resolver = resolver

    def check(self, url: str) -> str:
        """The address to connect to; `InvalidRequest` naming `webhook.url` when the URL may not be called."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"webhook.url: '{url}' is not an http(s) URL", "webhook.url")
        if parts.username is not None or parts.password is not None:  # (they would travel in the Host header)
            raise InvalidRequest(
                "webhook.url: credentials in the URL (user:pass@) are not sent; the signature authenticates",
                "webhook.url",
            )
        try:
            port = parts.port
        except ValueError:  # (out of range, or not a number)
            port = 0
        if port == 0:
            raise InvalidRequest(f"webhook.url: '{parts.netloc}' has no valid port (1..65535)", "webhook.url")
        if not self.names and not self.networks:
            raise InvalidRequest(
                "webhook: webhooks are off on this server (SDXL_WEBHOOK_ALLOWED_HOSTS lists where they may go)",
                "webhook",
            )
        host = parts.hostname.lower()
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            if host not in self.names:
                raise InvalidRequest(
                    f"webhook.url: {host} is not in SDXL_WEBHOOK_ALLOWED_HOSTS", "webhook.url"
                ) from None
            try:
                default_port = 443 if parts.scheme == "https" else 80
                addresses = [ipaddress.ip_address(a) for a in self.resolver(host, port or default_port)]
            except OSError as exc:
                raise InvalidRequest(f"webhook.url: {host} does not resolve ({exc})", "webhook.url") from None
        for address in addresses:
            listed = any(address in network for network in self.networks)
            if not listed and (host not in self.names or not address.is_global):
                raise InvalidRequest(
                    f"webhook.url: {host} is at {address}, which SDXL_WEBHOOK_ALLOWED_HOSTS does not allow",
                    "webhook.url",
                )
        return str(addresses[0])


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
        return True
    except ValueError:
        return False


class WebhookSender:
    """The thread that delivers webhook events, with retries; `record(job_id, event, outcome)`
    keeps each event's outcome on its job."""

    def __init__(
        self,
        secret: str | None,
        destinations: Destinations,
        attempts: int,
        retry_s: float,
        record: Callable[[str, str, dict[str, Any]], None],
    ):
        from standardwebhooks import Webhook

        self.signer = Webhook(secret) if secret else None
        self.destinations = destinations
        self.attempts = attempts
        self.retry_s = retry_s
        self.record = record
        self._queues: list[queue.Queue[tuple[str, str, str, str, Callable[[], dict[str, Any]]] | None]] = [
            queue.Queue() for _ in range(SENDERS)
        ]
        self._threads = [
            threading.Thread(target=self._deliver_all, args=(events,), name=f"sdxl-webhooks-{index}", daemon=True)
            for index, events in enumerate(self._queues)
        ]
        self._client = httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def send(self, job_id: str, event: str, message_id: str, url: str, body: Callable[[], dict[str, Any]]) -> None:
        """Queues one event for delivery (from any thread; never waits on the receiver). `body`
        is made on the sender's thread (it may keep images: the device does not wait for that)."""
        self._queues[int(job_id[:8], 16) % SENDERS].put((job_id, event, message_id, url, body))

    def close(self) -> None:
        for events in self._queues:
            events.put(None)
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout=TIMEOUT_S)
        self._client.close()

    def _deliver_all(self, events: queue.Queue) -> None:
        while (item := events.get()) is not None:
            job_id, event, message_id, url, body = item
            try:
                attempts = 1 if event == "progress" else self.attempts
                outcome = self._deliver(url, message_id, json.dumps({"event": event, **body()}), attempts)
            except Exception as exc:  # a bug here must not end the thread
                logger.exception("a webhook delivery failed unexpectedly")
                outcome = {"status": "failed", "attempts": 0, "error": type(exc).__name__}
            try:
                self.record(job_id, event, outcome)
            except Exception:  # (the job's store may be away: the receiver got it or not regardless)
                logger.warning("a webhook's outcome could not be kept on its job")

    def _deliver(self, url: str, message_id: str, payload: str, attempts: int) -> dict[str, Any]:
        """Posts `payload` until a 2xx, `attempts` times at most; `message_id` is the same for
        every retry of one event (and for a delivery taken over from a replica that stopped)."""
        error = ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(self.retry_s * 2 ** (attempt - 2))
            try:
                answer = self._post(url, message_id, payload)
                if 200 <= answer.status_code < 300:
                    return {"status": "delivered", "attempts": attempt}
                error = f"answered {answer.status_code}"
            except InvalidRequest as exc:  # the destination is no longer allowed: no retry
                return {"status": "failed", "attempts": attempt, "error": exc.message}
            except httpx.HTTPError as exc:
                error = type(exc).__name__
        logger.warning("a webhook was not delivered after %d attempt(s) (%s)", attempts, error)
        return {"status": "failed", "attempts": attempts, "error": error}

    def _post(self, url: str, message_id: str, payload: str) -> httpx.Response:
        address = self.destinations.check(url)
        parts = urlsplit(url)
        headers = {"content-type": "application/json", "webhook-id": message_id}
        now = datetime.now(tz=UTC)
        headers["webhook-timestamp"] = str(int(now.timestamp()))
        if self.signer is not None:
            headers["webhook-signature"] = self.signer.sign(message_id, now, payload)
        if parts.scheme == "http":  # to the address just checked: no second lookup to rebind
            host = f"[{address}]" if ":" in address else address
            headers["host"] = parts.netloc
            url = urlunsplit(parts._replace(netloc=f"{host}:{parts.port or 80}"))
        return self._client.post(url, content=payload.encode(), headers=headers)


class JobWebhooks:
    """The runtime's observer of jobs for their webhooks: what each change is to a job's webhook
    (started, progress at most once a second, completed), and its body, made on a sender thread.
    `started` and `completed` are held in the job queue while they are delivered; a thread takes
    over those held by replicas that stopped."""

    def __init__(self, sender: WebhookSender, keep: Callable[[bytes, str, str], str], jobs: JobQueue):
        self.sender = sender
        self.keep = keep  # keeps an image (data, media type, extension), returns its id
        self.jobs = jobs
        self._progress_told: dict[str, float] = {}  # job id -> when its webhook last heard of a step
        self._closing = threading.Event()
        self._takeover = threading.Thread(target=self._take_over, name="sdxl-webhooks-takeover", daemon=True)

    def start(self) -> None:
        self.sender.start()
        self._takeover.start()

    def close(self) -> None:
        self._closing.set()
        self.sender.close()

    def changed(self, job: Job) -> None:
        spec = job.webhook
        if spec is None:
            return
        event = self._event(job)
        if event is None or event not in spec["events"]:
            return
        message_id = f"msg_{secrets.token_hex(12)}"
        if event != "progress":  # (a progress event lost is superseded by the next)
            try:
                self.jobs.hold_webhook(job.id, event, message_id)
            except Exception:  # the store is away: delivered all the same, only not taken over
                logger.warning("a webhook event could not be held in the job queue; it is delivered regardless")
        self._send(job, spec, event, message_id)

    def _send(self, job: Job, spec: dict[str, Any], event: str, message_id: str) -> None:
        self.sender.send(job.id, event, message_id, spec["url"], lambda: self._body(job, spec))

    def _take_over(self) -> None:
        while not self._closing.wait(TAKEOVER_EVERY_S):
            try:
                orphans = self.jobs.orphaned_webhooks()
            except Exception:  # the store is away: the next round tries again
                continue
            for job, event, message_id in orphans:
                if job.webhook is not None:
                    logger.warning("a webhook event held by a replica that stopped is delivered from here")
                    self._send(job, job.webhook, event, message_id)

    def _event(self, job: Job) -> str | None:
        if job.status.final:
            self._progress_told.pop(job.id, None)
            return "completed"
        if job.status != JobStatus.RUNNING:
            return None
        if job.step == 0:
            return "started"
        now = time.monotonic()
        if now - self._progress_told.get(job.id, 0.0) < PROGRESS_EVERY_S:
            return None
        self._progress_told[job.id] = now
        return "progress"

    def _body(self, job: Job, spec: dict[str, Any]) -> dict[str, Any]:
        """The job's answer, its images as links to kept images unless base64 was asked for."""
        body = job_body(job, 0, spec["base_url"])
        result = body.get("result")
        if result and spec["images"] == "url":
            for image in result["images"]:
                image_id = self.keep(
                    base64.b64decode(image.pop("b64_json")), image["media_type"], image["media_type"].split("/")[1]
                )
                image["url"] = f"{spec['base_url']}/v1/images/files/{image_id}"
        return body
