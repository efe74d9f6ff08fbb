"""Images kept for `response_format: "url"`: served from this service for a while, then gone.

In memory, under a byte cap: the oldest image goes first when a new one does not fit, and an
image is deleted once its time is up. A link that expired answers 410, one that never
existed 404. A restart forgets every kept image.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class KeptImage:
    data: bytes
    media_type: str
    expires_at: float


class KeptImages:
    def __init__(self, ttl_s: float, max_bytes: int, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._images: OrderedDict[str, KeptImage] = OrderedDict()
        self._gone: OrderedDict[str, None] = OrderedDict()  # recently expired ids, for 410
        self._bytes = 0
        self._lock = threading.Lock()
        # Expired images are deleted even when no request comes.
        self._closing = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, args=(min(60.0, ttl_s),), name="kept-images-sweeper",
                                         daemon=True)
        self._sweeper.start()

    def put(self, data: bytes, media_type: str, extension: str) -> str:
        """Keep an image; returns its id (unguessable: the link is the only key to it)."""
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
