"""How the runtime is put together at start: the stores (this process's memory, or the Redis
the replicas share, with SDXL_REDIS_URL) and the webhooks' sender. The runtime (runtime.py) is
the façade the routes use over what is built here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.api.comfyui.records import MemoryPromptRecords, PromptRecords, SharedPromptRecords
from backends.api.composition import shared_redis
from backends.api.composition.caller_options import CallerOptions, MemoryCallerOptions, SharedCallerOptions
from backends.api.composition.settings import Settings
from backends.api.jobs.kept_images import KeptImages, KeptImageStore, SharedKeptImages
from backends.api.jobs.webhook_sender import Destinations, WebhookSender
from backends.api.jobs.webhooks import JobWebhooks
from backends.sdxl_backend.jobs import Job, JobJournal, MemoryJobQueue
from backends.sdxl_backend.jobs.contract import FleetView, JobQueue, WebhookLedger
from backends.sdxl_backend.jobs.redis_queue import SharedJobQueue
from backends.sdxl_backend.jobs.turns import QueueBounds
from backends.sdxl_backend.jobs.worker import Device


@dataclass
class Stores:
    """Where the jobs, kept images, callers' options and ComfyUI prompt records live. The job
    store is one object seen through its three contracts."""

    jobs: JobQueue
    fleet: FleetView
    webhook_ledger: WebhookLedger
    kept_images: KeptImageStore
    caller_options: CallerOptions
    comfyui_prompts: PromptRecords  # (what a ComfyUI prompt adds to its job)
    jobs_dir: Path | None = None  # the memory queue's journal (removed at a clean stop when it is the default)


def queue_bounds(settings: Settings) -> QueueBounds:
    return QueueBounds(
        max_queue=settings.max_queue,
        max_queued_per_owner=settings.queued_per_key_bound,
        ttl_s=settings.job_ttl_seconds,
        max_jobs=settings.max_jobs,
        max_bytes=settings.job_max_bytes,
        max_batch=settings.max_batch,
        order=settings.queue_order,
    )


def open_stores(
    settings: Settings,
    devices: list[Device],
    on_change: Callable[[Job], None],
    card: Callable[[], dict[str, Any]],
) -> Stores:
    """The stores: in this process, or in the Redis the replicas share. `on_change` hears of
    every job's change; `card` is this replica as a shared queue's heartbeat publishes it."""
    bounds = queue_bounds(settings)
    if settings.redis_url is None:
        # BentoML restarts a worker that dies under the same server process, the worker's parent:
        # the default journal is that process's, so a new worker finds its predecessor's jobs.
        jobs_dir = settings.jobs_dir or Path(tempfile.gettempdir()) / f"sdxl-jobs-{os.getppid()}"
        memory = MemoryJobQueue(devices, bounds, on_change, JobJournal(jobs_dir))
        return Stores(
            memory,
            memory,
            memory,
            KeptImages(settings.image_url_ttl_seconds, settings.image_url_max_bytes),
            MemoryCallerOptions(),
            MemoryPromptRecords(settings.job_ttl_seconds),
            jobs_dir,
        )
    client = shared_redis.connect(settings.redis_url)
    shared = SharedJobQueue(devices, client, bounds, on_change, card)
    return Stores(
        shared,
        shared,
        shared,
        SharedKeptImages(client, settings.image_url_ttl_seconds, settings.image_url_max_bytes),
        SharedCallerOptions(client),
        SharedPromptRecords(client, settings.job_ttl_seconds),
    )


def job_webhooks(settings: Settings, destinations: Destinations, stores: Stores) -> JobWebhooks | None:
    """The webhooks' observer of jobs, with its sender; None while no receiver is allowed
    (SDXL_WEBHOOK_ALLOWED_HOSTS unset)."""
    if not settings.webhook_allowed_hosts:
        return None
    sender = WebhookSender.configured(settings, destinations, stores.webhook_ledger.record_webhook)
    return JobWebhooks(sender, stores.kept_images.put, stores.webhook_ledger)
