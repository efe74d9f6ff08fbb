"""Webhooks on jobs: `POST /v1/jobs` with `webhook: {url, events}` has the server call `url`
when the job starts, as it progresses (a step, at most once a second) and when it ends, so an
automation need not poll.

- Signed the Standard Webhooks way (the `standardwebhooks` package): `webhook-id` (one per
  event: a receiver drops a repeat), `webhook-timestamp`, `webhook-signature` (HMAC-SHA256 with
  `SDXL_WEBHOOK_SECRET`). The body is the job's answer (`GET /v1/jobs/{id}`) and its `event`;
  the images as links to kept images (`/v1/images/files/...`), or base64 when asked.
- Delivered at least once: a 2xx ends it; anything else (or no answer within
  `SDXL_WEBHOOK_TIMEOUT_SECONDS`, 10 s, for the whole attempt) is tried again after 1, 2, 4...
  x `SDXL_WEBHOOK_RETRY_SECONDS`, `SDXL_WEBHOOK_ATTEMPTS` times in all; then the job records
  the failure (`webhooks` in its answer). A progress event is sent once (the next one
  supersedes it). The sender (webhook_sender.py) delivers on threads of its own, one lane per
  API key and receiving host, so the device never waits on a receiver, and a slow receiver
  holds up only its own lane. With a shared queue the replica that runs the job
  delivers, and holds each `started` and `completed` event in Redis until it is delivered or
  given up: when that replica dies first (kill -9, a lost node), another one claims the event
  once the dead one's heartbeat lapses and delivers it again, with the same `webhook-id`.
- Where a webhook may go (SSRF): only to the hosts of `SDXL_WEBHOOK_ALLOWED_HOSTS` (exact names,
  or addresses in listed CIDRs; empty: webhooks are refused, 400 naming the setting); a name
  that resolves to a private, loopback or link-local address is refused unless that address is
  in a listed CIDR. Checked at submit (a refused URL is a 400, no connection made) and again as
  each delivery connects, after DNS, to the address checked; redirects are not followed.
"""

from __future__ import annotations

import base64
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

from backends.api.jobs.answers import job_body
from backends.api.jobs.webhook_sender import WebhookSender
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.jobs.contract import WebhookLedger

logger = logging.getLogger(__name__)
WebhookEvent = Literal["started", "progress", "completed"]  # (jobs/job.py's WEBHOOK_EVENTS)
PROGRESS_EVERY_S = 1.0  # a webhook hears of a job's steps at most this often
TAKEOVER_EVERY_S = 2.0  # how often the events held by replicas that stopped are looked for


class WebhookSpec(BaseModel):
    url: str = Field(description="Where to POST each event (http or https, a host SDXL_WEBHOOK_ALLOWED_HOSTS lists).")
    events: list[WebhookEvent] = Field(
        ["completed"], min_length=1, description="Any of 'started', 'progress' (at most once a second), 'completed'."
    )
    images: Literal["url", "b64_json"] = Field("url", description="The result's images as links, or base64.")


class JobWebhooks:
    """The runtime's observer of jobs for their webhooks: what each change is to a job's webhook
    (started, progress at most once a second, completed), and its body, made on a sender thread.
    `started` and `completed` are held in the job queue while they are delivered; a thread takes
    over those held by replicas that stopped."""

    def __init__(self, sender: WebhookSender, keep: Callable[[bytes, str, str], str], ledger: WebhookLedger):
        self.sender = sender
        self.keep = keep  # keeps an image (data, media type, extension), returns its id
        self.ledger = ledger
        self._progress_told: dict[str, float] = {}  # job id -> when its webhook last heard of a step
        self._closing = threading.Event()
        self._takeover = threading.Thread(target=self._take_over, name="sdxl-webhooks-takeover", daemon=True)

    def start(self) -> None:
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
        # Held in the job queue while it is delivered (a progress event lost is superseded by the
        # next), by the sender's lane: this runs on the device thread, which waits on no store.
        hold = None if event == "progress" else functools.partial(self._hold, job.id, event, message_id)
        self._send(job, spec, event, message_id, hold)

    def _hold(self, job_id: str, event: str, message_id: str) -> None:
        try:
            self.ledger.hold_webhook(job_id, event, message_id)
        except Exception:  # the store is away: delivered all the same, only not taken over
            logger.warning("a webhook event could not be held in the job queue; it is delivered regardless")

    def _send(
        self, job: Job, spec: dict[str, Any], event: str, message_id: str, hold: Callable[[], None] | None = None
    ) -> None:
        self.sender.send(job.owner, job.id, event, message_id, spec["url"], lambda: self._body(job, spec), before=hold)

    def _take_over(self) -> None:
        while not self._closing.wait(TAKEOVER_EVERY_S):
            try:
                orphans = self.ledger.orphaned_webhooks()
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
