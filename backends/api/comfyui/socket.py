"""ComfyUI's WebSocket, `/ws?clientId=`: the life of each prompt its client queued, in ComfyUI's
events (answers.py shapes them):

    status (on connect, with the client's `sid`) -> execution_start -> execution_cached ->
    executing (each node up to the sampler) -> progress (each step) -> executing, executed
    (each output's images) -> execution_success (or execution_error, or execution_interrupted)
    -> executing with no node -> status (what the client still has queued).

The socket follows its client's prompts through their jobs, wherever they run: a prompt queued
on this replica wakes it at once, one queued on another is found within a second (the records
are shared with the queue, `SDXL_REDIS_URL`). A client that connects late still gets the end
of a prompt that ended within the last minute. With `extra_data.preview_method` ("auto",
"latent2rgb", "taesd") a prompt's steps also send binary preview frames (ComfyUI's framing:
event 1, format 2, a PNG); without it, none, as ComfyUI's default. A socket that closes leaves
its prompts running, as ComfyUI's do: clients reconnect at will (comfyui-sdk after 10 s without
a message, which the `status` sent every 5 s prevents).

The edge (backends/api/edge/middleware.py) has checked the socket's Host, Origin and API key (a header,
or `?token=` where a browser cannot send one); each key has at most SDXL_MAX_EVENT_STREAMS
sockets and event streams open together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from backends.api.comfyui.answers import final_events, progress_event, started_events
from backends.api.comfyui.records import PromptRecord
from backends.api.composition.runtime import Runtime
from backends.api.edge.headers import presented_key
from backends.sdxl_backend.errors import BackendError
from backends.sdxl_backend.jobs import Job

router = APIRouter()
KEEPALIVE_S = 5.0  # a `status` this often when nothing else is said
FOUND_WITHIN_S = 1.0  # a prompt queued on another replica is found this soon
REPLAY_S = 60.0  # a client that connects late gets the end of prompts that ended this recently


class Sockets:
    """The sockets open on this replica, by client id, so that a prompt queued here wakes its
    client's socket at once (on the event loop only)."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def register(self, client_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiting.setdefault(client_id, set()).add(event)
        return event

    def unregister(self, client_id: str, event: asyncio.Event) -> None:
        waiting = self._waiting.get(client_id, set())
        waiting.discard(event)
        if not waiting:
            self._waiting.pop(client_id, None)

    def wake(self, client_id: str) -> None:
        for event in self._waiting.get(client_id, ()):
            event.set()


SOCKETS = Sockets()


class Follower:
    """One socket's view of its client's prompts: what it has told of each."""

    def __init__(self, websocket: WebSocket, runtime: Runtime, client_id: str, owner: str | None):
        self.websocket, self.runtime, self.client_id, self.owner = websocket, runtime, client_id, owner
        self.told: dict[str, tuple[bool, int]] = {}  # prompt id -> (its start told, the last step told)
        self.ended: set[str] = set()
        self.last_sent = 0.0

    async def send(self, event: str, data: dict[str, Any]) -> None:
        await self.websocket.send_text(json.dumps({"type": event, "data": data}))
        self.last_sent = time.monotonic()

    async def status(self, queue_remaining: int, with_sid: bool = False) -> None:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": queue_remaining}}}
        await self.send("status", {**data, "sid": self.client_id} if with_sid else data)

    def read(self) -> list[tuple[Job, PromptRecord]]:
        """The client's prompts not yet told to their end, as their jobs stand now."""
        prompts = []
        for prompt_id in self.runtime.comfyui_prompts.of_client(self.client_id):
            if prompt_id in self.ended:
                continue
            record = self.runtime.comfyui_prompts.get(prompt_id)
            try:
                job = self.runtime.job_of(prompt_id, self.owner)
            except BackendError:  # (expired, or another key's: nothing to tell)
                self.ended.add(prompt_id)
                continue
            if record is not None:
                prompts.append((job, record))
        return prompts

    async def tell(self, job: Job, record: PromptRecord) -> bool:
        """Sends what changed for one prompt; True when it has ended."""
        started, step = self.told.get(job.id, (False, 0))
        if job.status.value == "queued":
            return False
        if not started:
            for event in started_events(job, record):
                await self.send(*event)
        if job.step > step and not job.status.final:
            await self.send(*progress_event(job, record))
            if record.previews and job.preview is not None:
                # ComfyUI's framing: event 1 (a preview image), format 2 (PNG), then the image.
                await self.websocket.send_bytes(struct.pack(">II", 1, 2) + job.preview)
        self.told[job.id] = (True, job.step)
        if job.status.final:
            for event in final_events(job, record):
                await self.send(*event)
            self.ended.add(job.id)
            self.told.pop(job.id, None)
        return job.status.final

    async def follow(self, wake: asyncio.Event) -> None:
        connected = time.time()
        first = await anyio.to_thread.run_sync(self.read)
        for job, _ in first:  # ended before this socket: only the recent ends are told again
            if job.status.final and (job.finished or 0) < connected - REPLAY_S:
                self.ended.add(job.id)
        await self.status(sum(not job.status.final for job, _ in first), with_sid=True)
        while True:
            try:
                prompts = await anyio.to_thread.run_sync(self.read)
                ended = [await self.tell(job, record) for job, record in prompts]
            except BackendError:  # (Redis away for a moment: try again)
                prompts, ended = [], []
            active = [job for (job, _), done in zip(prompts, ended) if not done]
            if any(ended) or time.monotonic() - self.last_sent >= KEEPALIVE_S:
                await self.status(len(active))
            wake.clear()
            if active:
                with contextlib.suppress(BackendError):
                    await self.runtime.changed(active[0], active[0].version, FOUND_WITHIN_S)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), FOUND_WITHIN_S)


@router.websocket("/ws")
async def socket(websocket: WebSocket, clientId: str | None = None) -> None:
    runtime: Runtime = websocket.app.state.runtime
    owner = runtime.owner_of(presented_key(websocket.headers) or websocket.query_params.get("token"))
    slots = owner or ""
    if runtime.event_streams[slots] >= runtime.settings.max_event_streams:
        await websocket.close(code=1013, reason="too many sockets and event streams open (SDXL_MAX_EVENT_STREAMS)")
        return
    client_id = clientId or uuid.uuid4().hex
    runtime.event_streams[slots] += 1
    wake = SOCKETS.register(client_id)
    try:
        await websocket.accept()
        follower = Follower(websocket, runtime, client_id, owner)
        async with anyio.create_task_group() as group:

            async def until_closed() -> None:
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass  # (a client says nothing ComfyUI acts on)
                group.cancel_scope.cancel()

            group.start_soon(until_closed)
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # (closed while sending)
                await follower.follow(wake)
            group.cancel_scope.cancel()
    finally:
        SOCKETS.unregister(client_id, wake)
        runtime.event_streams[slots] -= 1
