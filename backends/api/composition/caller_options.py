"""What a caller has set for itself: AUTOMATIC1111's options (`POST /sdapi/v1/options`), kept
per API key, so that one tenant never changes another's; the default model among them
(`sd_model_checkpoint`) is what that key's requests without a `model` get, in every dialect.
Without API keys every caller is the same one, as on A1111 itself.

`MemoryCallerOptions` keeps them in this process; `SharedCallerOptions` in Redis
(`SDXL_REDIS_URL`), where every replica reads the same. Both are a `CallerOptions`
(tests/test_caller_options.py runs the same checks on each).
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any, Protocol

from backends.sdxl_backend.errors import InvalidRequest, redis_failures_as_unavailable

if TYPE_CHECKING:
    import redis

MODEL_OPTION = "sd_model_checkpoint"
MAX_OPTIONS_BYTES = 64 * 1024  # a caller's options, as JSON: a client must not grow them without end


class CallerOptions(Protocol):
    def get(self, owner: str) -> dict[str, Any]:
        """The options `owner` (an API key's digest, "" without keys) has set."""

    def update(self, owner: str, changes: dict[str, Any]) -> None:
        """Set these options for `owner`, keeping the others; over `MAX_OPTIONS_BYTES` in all,
        an `InvalidRequest` and nothing changed."""


def _check_size(options: dict[str, Any]) -> None:
    if len(json.dumps(options)) > MAX_OPTIONS_BYTES:
        raise InvalidRequest(
            f"options: the options kept for a caller are limited to {MAX_OPTIONS_BYTES} bytes of JSON", "options"
        )


class MemoryCallerOptions:
    def __init__(self) -> None:
        self._options: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, owner: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._options.get(owner, {}))

    def update(self, owner: str, changes: dict[str, Any]) -> None:
        with self._lock:
            merged = {**self._options.get(owner, {}), **changes}
            _check_size(merged)
            self._options[owner] = merged


class SharedCallerOptions:
    """A hash per caller, one field an option (its value as JSON). Redis out of reach is
    `StoreUnavailable` (503), never a hang."""

    PREFIX = "sdxl:options:"

    def __init__(self, client: redis.Redis):
        self.client = client

    def get(self, owner: str) -> dict[str, Any]:
        with redis_failures_as_unavailable():
            fields = self.client.hgetall(self.PREFIX + owner)
        # (bytes: the client does not decode)
        return {name.decode() if isinstance(name, bytes) else name: json.loads(value) for name, value in fields.items()}

    def update(self, owner: str, changes: dict[str, Any]) -> None:
        if not changes:
            return
        _check_size({**self.get(owner), **changes})  # (two replicas at once may pass it by one update)
        with redis_failures_as_unavailable():
            self.client.hset(self.PREFIX + owner, mapping={name: json.dumps(value) for name, value in changes.items()})
