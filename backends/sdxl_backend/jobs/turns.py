"""Whose job runs next: the queue's bounds, and the order its waiting jobs take turns in.

Fair shares ("fair", the default): higher priorities first; within a priority, owners (API
keys) take turns: each owner's oldest waiting job forms the first round, their second-oldest
the next, and within a round the owner served longest ago goes first. So an owner with ten
jobs waiting and one who submits a single job now share the device one job each: the
newcomer's job is at most one job away. "fifo": arrival order (priorities still first).

A queue keeps its jobs in arrival order and each owner's last turn at each priority (a
counter, not a clock: replicas' clocks need not agree; per priority, so that a 'high' job taken
does not move its owner's other jobs back). A job's position is its place in this order: it
holds while nothing arrives, and can move when something does. The shared queue decides in
Lua the same way (scripts/turns.lua, and take.lua for `first_batch`): tests/test_job_queues.py
holds both stores to it, and tests/test_turns.py draws queues to compare the two.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

T = TypeVar("T")
QueueOrder = Literal["fair", "fifo"]
PRIORITIES = {"high": 0, "normal": 1, "low": 2}  # taken in this order
LOOKAHEAD_BATCHES = 2  # a job may join a batch when its turn is within this many batches' worth of jobs


@dataclass(frozen=True)
class QueueBounds:
    """How much a queue holds, and how it orders and batches what waits."""

    max_queue: int = 64  # jobs waiting, in all; more are refused (429)
    max_queued_per_owner: int = 0  # jobs one owner may have waiting; 0: no bound but max_queue
    ttl_s: float = 3600  # finished jobs (and their images) are kept this long...
    max_jobs: int = 1000  # ... at most this many...
    max_bytes: int = 512 * 2**20  # ... holding at most this many bytes
    max_batch: int = 1  # images of compatible jobs in one pipeline call; 1: each job alone
    order: QueueOrder = "fair"
    # A forgotten job's id answers "expired" (410) this long, then "unknown" (404): one rule for
    # both stores (the memory store also remembers at most MAX_TOMBSTONES ids, for its memory's sake).
    tombstone_ttl_s: float = 86400

    @property
    def lookahead(self) -> int:
        """How many jobs in turn order a batch's head looks at for others to join it."""
        return 1 + LOOKAHEAD_BATCHES * self.max_batch


def slot(owner: str | None, priority: str) -> str:
    """What takes turns: an owner's jobs of one priority ("normal:<owner>")."""
    return f"{priority}:{owner or ''}"


def turn_order(
    waiting: Sequence[T],
    slot_of: Callable[[T], str],
    last_turn: Mapping[str, int],
    order: QueueOrder = "fair",
) -> list[T]:
    """`waiting` (in arrival order) in the order the devices will take it, if nothing else arrives."""
    rounds: Counter[str] = Counter()
    keyed = []
    for arrival, item in enumerate(waiting):
        owners_slot = slot_of(item)
        priority = PRIORITIES[owners_slot.partition(":")[0]]
        if order == "fair":
            keyed.append(((priority, rounds[owners_slot], last_turn.get(owners_slot, 0), arrival), item))
            rounds[owners_slot] += 1
        else:
            keyed.append(((priority, 0, 0, arrival), item))
    return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]


def first_batch(
    in_turn: Sequence[T], batch_key: Callable[[T], object], images: Callable[[T], int], bounds: QueueBounds
) -> list[T]:
    """What a device takes next: the job whose turn it is, and among the next `lookahead` in
    turn order those of its batch key (None: it runs alone), in turn order, while their images
    fit in `max_batch`."""
    head, *next_ones = in_turn[: bounds.lookahead]
    batch, count = [head], images(head)
    key = batch_key(head) if count < bounds.max_batch else None
    for item in next_ones if key is not None else []:
        n = images(item)
        if count + n <= bounds.max_batch and batch_key(item) == key:
            batch.append(item)
            count += n
            if count == bounds.max_batch:
                break
    return batch
