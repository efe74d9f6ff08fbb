"""Images kept for `response_format: "url"`: served from this service for a while, then gone.

Under a byte cap: the oldest image goes first when a new one does not fit, and an image is
deleted once its time is up. A link that expired answers 410, one that never existed 404.
`KeptImages` keeps them in this process (a restart forgets them); `SharedKeptImages` in Redis
(`SDXL_REDIS_URL`), where every replica serves every link and the cap holds for all of them.
Both are a `KeptImageStore` (tests/test_kept_images.py runs the same checks on each).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from backends.sdxl_backend.errors import redis_failures_as_unavailable

if TYPE_CHECKING:
    import redis


@dataclass(frozen=True)
class KeptImage:
    data: bytes
    media_type: str
    expires_at: float


class KeptImageStore(Protocol):
    def put(self, data: bytes, media_type: str, extension: str) -> str:
        """Keep an image; returns its id (unguessable: the link is the only key to it)."""

    def get(self, image_id: str) -> KeptImage | None:
        """The image, while it is kept."""

    def expired(self, image_id: str) -> bool:
        """Whether the id was kept and is gone (past its time, or pushed out by the cap): 410, not 404."""

    def close(self) -> None: ...

    @property
    def total_bytes(self) -> int:
        """What the kept images weigh together."""


class KeptImages:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._images: OrderedDict[str, KeptImage] = OrderedDict()
        self._gone: OrderedDict[str, None] = OrderedDict()  # recently expired ids, for 410
        self._bytes = 0
        self._lock = threading.Lock()
        # Expired images are deleted even when no request comes.
        self._closing = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep, args=(min(60.0, ttl_s),), name="kept-images-sweeper", daemon=True
        )
        self._sweeper.start()

    def put(self, data: bytes, media_type: str, extension: str) -> str:
        image_id = f"{secrets.token_urlsafe(16)}.{extension}"
        with self._lock:
            self._expire()
            while self._images and self._bytes + len(data) > self.max_bytes:
                self._drop(next(iter(self._images)))
            self._images[image_id] = KeptImage(data, media_type, self._clock() + self.ttl_s)
            self._bytes += len(data)
        return image_id

    def get(self, image_id: str) -> KeptImage | None:
        with self._lock:
            self._expire()
            return self._images.get(image_id)

    def expired(self, image_id: str) -> bool:
        """Whether `image_id` was kept once and is gone now (timed out or pushed out)."""
        with self._lock:
            return image_id in self._gone

    def close(self) -> None:
        self._closing.set()
        self._sweeper.join()

    def _sweep(self, interval_s: float) -> None:
        while not self._closing.wait(interval_s):
            with self._lock:
                self._expire()

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def _expire(self) -> None:
        now = self._clock()
        while self._images and next(iter(self._images.values())).expires_at <= now:
            self._drop(next(iter(self._images)))

    def _drop(self, image_id: str) -> None:
        self._bytes -= len(self._images.pop(image_id).data)
        self._gone[image_id] = None
        while len(self._gone) > 100_000:
            self._gone.popitem(last=False)


# Adds an image and, in the same step, drops the expired ones and then the oldest while the
# images are over the cap; each dropped id leaves a tombstone (for 410) that lasts a day.
# The index never ties (an image kept in the newest one's millisecond expires 1 ms after it):
# tied scores sort by id, which is random, and the cap would drop any of them, not the oldest.
# KEYS: the age index (a sorted set by expiry), the sizes (a hash), the byte total, the key
# prefix. ARGV: id, data, media type, time to live (ms), cap (bytes).
PUT_SCRIPT = """
local index, sizes, total, prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, data, media_type, ttl_ms, cap = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function drop(old)
  redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, old) or '0'))
  redis.call('HDEL', sizes, old)
  redis.call('ZREM', index, old)
  redis.call('DEL', prefix .. 'image:' .. old)
  redis.call('SET', prefix .. 'gone:' .. old, '1', 'EX', 86400)
end
for _, old in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now_ms)) do drop(old) end
while tonumber(redis.call('GET', total) or '0') + #data > cap do
  local oldest = redis.call('ZRANGE', index, 0, 0)[1]
  if not oldest then break end
  drop(oldest)
end
local expires_ms = now_ms + ttl_ms
local newest = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= expires_ms then expires_ms = tonumber(newest[2]) + 1 end
redis.call('HSET', prefix .. 'image:' .. id, 'data', data, 'media_type', media_type)
redis.call('PEXPIREAT', prefix .. 'image:' .. id, expires_ms)
redis.call('ZADD', index, expires_ms, id)
redis.call('HSET', sizes, id, #data)
redis.call('INCRBY', total, #data)
"""


class SharedKeptImages:
    """Kept images in Redis: each image a key that expires with its time to live, an index by
    expiry and a byte total for the cap (kept up to date when an image is added). Redis out of
    reach is `StoreUnavailable` (503) after at most a few seconds, never a hang."""

    PREFIX = "sdxl:kept:"

    def __init__(self, client: redis.Redis, ttl_s: float, max_bytes: int):
        self.client = client
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._put = client.register_script(PUT_SCRIPT)
        self._keys = [self.PREFIX + "index", self.PREFIX + "sizes", self.PREFIX + "bytes", self.PREFIX]

    def put(self, data: bytes, media_type: str, extension: str) -> str:
        image_id = f"{secrets.token_urlsafe(16)}.{extension}"
        with redis_failures_as_unavailable():
            self._put(keys=self._keys, args=[image_id, data, media_type, int(self.ttl_s * 1000), self.max_bytes])
        return image_id

    def get(self, image_id: str) -> KeptImage | None:
        with redis_failures_as_unavailable():
            found = self.client.hgetall(self.PREFIX + "image:" + image_id)
        if not found:
            return None
        data, media_type = found[b"data"], found[b"media_type"]  # (bytes: the client does not decode)
        assert isinstance(data, bytes) and isinstance(media_type, bytes)
        return KeptImage(data, media_type.decode(), 0.0)

    def expired(self, image_id: str) -> bool:
        with redis_failures_as_unavailable():
            if self.client.exists(self.PREFIX + "gone:" + image_id):
                return True
            indexed = self.client.zscore(self._keys[0], image_id) is not None
            return indexed and not self.client.exists(self.PREFIX + "image:" + image_id)  # and its key is gone

    def close(self) -> None:
        self.client.close()

    @property
    def total_bytes(self) -> int:
        with redis_failures_as_unavailable():
            return int(self.client.get(self._keys[2]) or 0)
