"""For the people who run the server: `GET /v1/system/fleet` (every replica, the queue, the
last minutes, the last errors, as JSON) and `/ui/fleet`, the page that shows it.

Each replica publishes its card (`Runtime.card`: devices, memory, loaded models, the job each
device runs) with its heartbeat in Redis; alone, the card is this process's. The queue's
figures come from the newest jobs the store holds (their records: no image is read). Nothing
here names a prompt, a key or a job: the jobs waiting are counted per key digest (the first 8
characters of the digest the queue keeps, never the key)."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors, headers
from backends.api.native.playground import page
from backends.sdxl_backend.jobs import Job, JobStatus

PAGE = Path(__file__).with_name("fleet.html")
RECENT_JOBS = 100  # the newest jobs the figures are made from
MINUTES = 10  # the sparklines' span, a point a minute
LAST_ERRORS = 5

router = APIRouter(tags=["system"])
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


@router.get("/v1/system/fleet", responses=errors.responses(401, 503))
async def fleet(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Every replica (its devices, memory, loaded models, running job's steps), the queue
    (length, oldest wait, jobs waiting per key digest), jobs finished and seconds per step over
    the last minutes, and the last errors. A key that is not an admin's (SDXL_ADMIN_KEYS) sees
    its own row of the queue and its own errors, never another tenant's."""
    settings = runtime.settings
    admin = headers.holds_admin_key(request.headers, settings.api_keys, settings.admin_keys)
    owner = runtime.owner(request)
    here = runtime.card()
    others, jobs, length = await runtime.fleet_reads(RECENT_JOBS)
    now = time.time()
    return {
        "replicas": [{**here, "here": True}]
        + [{**card, "here": False} for card in others if card["replica"] != here["replica"]],
        "queue": queue_figures(jobs, length, now, None if admin else owner),
        "minutes": minute_figures(jobs, now),
        "errors": [
            {"type": type(job.error).__name__, "message": job.error.message, "at": job.finished}
            for job in jobs
            if job.status == JobStatus.FAILED and job.error is not None and (admin or job.owner == owner)
        ][:LAST_ERRORS],
    }


def queue_figures(jobs: list[Job], length: int, now: float, only: str | None = None) -> dict[str, Any]:
    """The queue's length and oldest wait, and the jobs waiting per key digest (with `only`,
    that key's row alone)."""
    waiting = [job for job in jobs if job.status == JobStatus.QUEUED]
    by_key = Counter((job.owner or "no key")[:8] for job in waiting if only is None or job.owner == only)
    return {
        "length": length,
        "oldest_wait_s": round(now - min(job.created for job in waiting), 1) if waiting else 0.0,
        "by_key": dict(by_key),
    }


def minute_figures(jobs: list[Job], now: float) -> dict[str, list]:
    """Jobs finished in each of the last minutes (oldest first) and their median seconds per
    step (null for a minute with none)."""
    finished: list[int] = [0] * MINUTES
    paces: list[list[float]] = [[] for _ in range(MINUTES)]
    for job in jobs:
        if job.finished is None or (age := now - job.finished) >= MINUTES * 60:
            continue
        minute = MINUTES - 1 - int(age // 60)
        finished[minute] += 1
        if job.status == JobStatus.SUCCEEDED and job.started is not None and job.step:
            paces[minute].append((job.finished - job.started) / job.step)
    return {
        "finished": finished,
        "seconds_per_step": [round(statistics.median(pace), 3) if pace else None for pace in paces],
    }


@router.get("/ui/fleet", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
async def fleet_page() -> HTMLResponse:
    """The fleet page: replicas, devices, the queue and the last errors, refreshed every few seconds."""
    return page(PAGE)
