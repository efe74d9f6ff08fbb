"""Every Redis key and channel the shared queue uses, named in one place. The Lua scripts
(scripts/) build the same names from the prefix they are given (prelude.lua)."""

from __future__ import annotations

PREFIX = "sdxl:jobs:"

QUEUE = PREFIX + "queue"  # list: the waiting job ids, in arrival order (turns.lua orders them)
TURNS = PREFIX + "turns"  # hash: "<priority>:<owner>" -> the turn its last job was taken at
TURN = PREFIX + "turn"  # counter: the turns taken
RUNNING = PREFIX + "running"  # hash: running job id -> the replica running it
INDEX = PREFIX + "index"  # sorted set: every job held, by creation time
CHANGES = PREFIX + "changed"  # channel: each change of a job, as its id ("<id> final" when it ends)
WAKE = PREFIX + "wake"  # list: pushed by every submit, for the idle device threads
# hash: "<job id> <event>" -> {replica, message_id} of each webhook event being delivered
WEBHOOKS = PREFIX + "webhooks"


def job(job_id: str) -> str:
    """Hash: the job (its prepared request, its state, then its result)."""
    return f"{PREFIX}job:{job_id}"


def gone(job_id: str) -> str:
    """The tombstone of an evicted job: expired (410), not unknown (404)."""
    return f"{PREFIX}gone:{job_id}"


def replica(name: str) -> str:
    """A replica's heartbeat, its card (JSON), which expires when it stops beating."""
    return f"{PREFIX}replica:{name}"


def wake_for(name: str) -> str:
    """List: work handed to one device thread of a replica (`<replica>/<device>`), such as an unload."""
    return f"{PREFIX}wake:{name}"
