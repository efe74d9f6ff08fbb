"""`ChangeFeed`: this replica's one subscription to the fleet's job changes (keys.CHANGES). Each
change of a job (taken, a step, a flag, finished, re-queued) is published as the job's id
(`<id> final` when it ends); the feed wakes the requests waiting on that job, which then read it.
A notice lost while Redis reconnects costs a waiter at most `FALLBACK_S`: it reads its job that
often anyway."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from backends.sdxl_backend.jobs.redis_queue import keys
from backends.sdxl_backend.jobs.waiting import Watchers

if TYPE_CHECKING:
    import redis

FALLBACK_S = 1.0  # a waiter reads its job at least this often, in case a change notice was lost


class ChangeFeed:
    def __init__(self, client: redis.Redis):
        self.client = client
        self.watchers = Watchers()
        self._closing = threading.Event()
        self._subscription: redis.client.PubSub | None = None
        self._thread = threading.Thread(target=self._listen, name="sdxl-job-changes", daemon=True)

    def start(self) -> None:
        """Subscribes (changes published from now on are noticed), then listens on a thread of its own."""
        try:
            self._subscription = self._subscribe()
        except Exception:  # Redis away: the thread subscribes once it is back
            self._subscription = None
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)

    def _subscribe(self) -> redis.client.PubSub:
        subscription = self.client.pubsub()
        try:
            subscription.subscribe(keys.CHANGES)
            subscription.get_message(timeout=3)  # Redis's confirmation: from here on, every change is noticed
        except Exception:
            subscription.close()
            raise
        return subscription

    def _listen(self) -> None:
        while not self._closing.is_set():
            try:
                self._subscription = self._subscription or self._subscribe()
                while not self._closing.is_set():
                    notice = self._subscription.get_message(timeout=1.0)
                    if notice is not None and notice["type"] == "message":
                        job_id, _, final = notice["data"].decode().partition(" ")
                        self.watchers.wake(job_id, final == "final")
            except Exception:  # Redis away (the queue says so): waiters read their jobs every FALLBACK_S meanwhile
                self._closing.wait(1)
            finally:
                if self._subscription is not None:
                    self._subscription.close()
                self._subscription = None
