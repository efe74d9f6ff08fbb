"""What a ComfyUI prompt adds to its job: its queue number, the client that queued it (whose
socket gets its events), its output nodes and sampler (which the events and the history name),
and the workflow itself (which `/queue` and `/history` show back). The prompt's id is its job's.

`MemoryPromptRecords` keeps them in this process; `SharedPromptRecords` in Redis
(`SDXL_REDIS_URL`), so that any replica answers `/history` and any replica's socket follows a
prompt. Both are a `PromptRecords` (tests/test_comfyui_records.py runs the same checks on each).
A record lives as long as its job is kept (SDXL_JOB_TTL_SECONDS).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from backends.sdxl_backend.errors import redis_failures_as_unavailable

if TYPE_CHECKING:
    import redis

PREFIX = "sdxl:comfyui:"
CLIENT_PROMPTS = 100  # the prompts a client's socket follows: its newest
MAX_RECORDS = 10_000  # kept in memory at most (the oldest go first)


@dataclass
class PromptRecord:
    number: int
    client_id: str | None
    outputs: dict[str, str]  # output node id -> image type ("output" or "temp")
    sampler: str
    executed: list[str]
    images: int = 1  # the images it makes (the batch size), and their file extension
    extension: str = "png"
    previews: bool = False  # whether its socket gets preview frames (extra_data's preview_method)
    workflow: dict[str, Any] = field(default_factory=dict)
    extra_data: dict[str, Any] = field(default_factory=dict)


class PromptRecords(Protocol):
    def next_number(self) -> int:
        """ComfyUI's queue number of the next prompt (increasing)."""

    def put(self, prompt_id: str, record: PromptRecord) -> None: ...

    def get(self, prompt_id: str) -> PromptRecord | None: ...

    def delete(self, prompt_id: str) -> None:
        """Forget the record (`POST /history {delete}`): the prompt leaves the history."""

    def of_client(self, client_id: str) -> list[str]:
        """The prompts a client queued (its newest `CLIENT_PROMPTS`), oldest first."""


class MemoryPromptRecords:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self._clock = ttl_s, clock
        self._records: OrderedDict[str, tuple[float, PromptRecord]] = OrderedDict()
        self._clients: dict[str, list[str]] = {}
        self._number = 0
        self._lock = threading.Lock()

    def next_number(self) -> int:
        with self._lock:
            self._number += 1
            return self._number

    def put(self, prompt_id: str, record: PromptRecord) -> None:
        with self._lock:
            self._expire()
            self._records[prompt_id] = (self._clock() + self.ttl_s, record)
            while len(self._records) > MAX_RECORDS:
                self._records.popitem(last=False)
            if record.client_id is not None:
                prompts = self._clients.setdefault(record.client_id, [])
                prompts.append(prompt_id)
                del prompts[:-CLIENT_PROMPTS]

    def get(self, prompt_id: str) -> PromptRecord | None:
        with self._lock:
            self._expire()
            kept = self._records.get(prompt_id)
            return kept[1] if kept else None

    def delete(self, prompt_id: str) -> None:
        with self._lock:
            self._records.pop(prompt_id, None)

    def of_client(self, client_id: str) -> list[str]:
        with self._lock:
            self._expire()
            return [prompt_id for prompt_id in self._clients.get(client_id, []) if prompt_id in self._records]

    def _expire(self) -> None:
        now = self._clock()
        while self._records and next(iter(self._records.values()))[0] <= now:
            self._records.popitem(last=False)
        for client_id in [c for c, prompts in self._clients.items() if not any(p in self._records for p in prompts)]:
            del self._clients[client_id]


class SharedPromptRecords:
    """A string per record (its JSON), a list per client, both expiring with the jobs. Redis out
    of reach is `StoreUnavailable` (503), never a hang."""

    def __init__(self, client: redis.Redis, ttl_s: float):
        self.client, self.ttl_s = client, max(1, int(ttl_s))

    def next_number(self) -> int:
        with redis_failures_as_unavailable():
            return int(self.client.incr(PREFIX + "number"))

    def put(self, prompt_id: str, record: PromptRecord) -> None:
        with redis_failures_as_unavailable():
            pipe = self.client.pipeline(transaction=False)
            pipe.set(PREFIX + "prompt:" + prompt_id, json.dumps(asdict(record)), ex=self.ttl_s)
            if record.client_id is not None:
                key = PREFIX + "client:" + record.client_id
                pipe.rpush(key, prompt_id)
                pipe.ltrim(key, -CLIENT_PROMPTS, -1)
                pipe.expire(key, self.ttl_s)
            pipe.execute()

    def get(self, prompt_id: str) -> PromptRecord | None:
        with redis_failures_as_unavailable():
            kept = self.client.get(PREFIX + "prompt:" + prompt_id)
        return PromptRecord(**json.loads(kept)) if kept else None

    def delete(self, prompt_id: str) -> None:
        with redis_failures_as_unavailable():
            self.client.delete(PREFIX + "prompt:" + prompt_id)

    def of_client(self, client_id: str) -> list[str]:
        with redis_failures_as_unavailable():
            stored: list[bytes] = self.client.lrange(PREFIX + "client:" + client_id, 0, -1)  # type: ignore[assignment]
            listed = [p.decode() for p in stored]
            if not listed:
                return []
            present = self.client.exists(*(PREFIX + "prompt:" + p for p in listed))
            if present == len(listed):
                return listed
            return [p for p in listed if self.client.exists(PREFIX + "prompt:" + p)]
