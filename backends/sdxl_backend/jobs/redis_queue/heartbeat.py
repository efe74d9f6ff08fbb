"""A replica's presence in the fleet: its heartbeat (its card, which expires when it stops
beating), the reclaim of the running jobs of replicas that stopped, which every replica runs
as it beats, and whether Redis answers this replica (said once per outage, whichever of its
threads finds out)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.sdxl_backend.jobs.redis_queue import keys

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # each replica says it is alive this often...
HEARTBEAT_TTL_S = 10  # ...and is taken for dead, its running jobs re-queued, this long after it stops
MAX_ATTEMPTS = 3  # runs of a job cut short by its replica dying, before it fails


class Heartbeat:
    def __init__(
        self,
        client: redis.Redis,
        replica: str,
        card: Callable[[], dict],
        reclaim: Callable[[int], tuple[int, int]],
    ):
        self.client = client
        self.replica = replica
        self.card = card  # what this replica publishes with each beat (`cards`)
        self.reclaim = reclaim  # the RECLAIM script: (re-queued, failed) given the attempts allowed
        self._stopped = threading.Event()
        self._reachable = True  # last time a thread of this replica tried
        self._thread = threading.Thread(target=self._beat, name="sdxl-heartbeat", daemon=True)

    def start(self) -> None:
        try:
            self.beat()  # before the first take: a job this replica takes is never an orphan
        except Exception as exc:  # Redis away: the device threads wait for it
            self.failed(exc)
        self._thread.start()

    def beat(self) -> None:
        card = json.dumps({**self.card(), "replica": self.replica, "beat": time.time()})
        self.client.set(keys.replica(self.replica), card, ex=HEARTBEAT_TTL_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *own_keys: str) -> None:
        """Stop beating, and delete the card (and `own_keys`, this replica's other keys) at once:
        the others need not wait for the lapse to take its jobs over."""
        self._stopped.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):  # Redis away: the heartbeat lapses by itself
            self.client.delete(keys.replica(self.replica), *own_keys)

    def cards(self) -> list[dict]:
        """The cards of the live replicas, this one's included, by name."""
        names = list(self.client.scan_iter(match=keys.replica("*"), count=1000))
        cards = self.client.mget(names) if names else []
        return sorted((json.loads(card) for card in cards if card), key=lambda card: card["replica"])

    def answered(self) -> None:
        """Redis answered a thread of this replica."""
        if not self._reachable:
            logger.info("Redis (SDXL_REDIS_URL) answers again: the shared queue goes on")
        self._reachable = True

    def failed(self, exc: Exception) -> bool:
        """True (and said once per outage) when `exc` is Redis out of reach."""
        import redis

        if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return False
        if self._reachable:
            logger.warning(
                "Redis (SDXL_REDIS_URL) cannot be reached (%s): the shared queue waits for it", type(exc).__name__
            )
        self._reachable = False
        return True

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self.beat()
                requeued, failed = self.reclaim(MAX_ATTEMPTS)
                if requeued or failed:
                    logger.warning(
                        "%d job(s) of a replica that stopped were re-queued, %d failed after %d attempts",
                        requeued,
                        failed,
                        MAX_ATTEMPTS,
                    )
                self.answered()
            except Exception as exc:
                if not self.failed(exc):
                    logger.exception("the heartbeat caught an error; it goes on")
