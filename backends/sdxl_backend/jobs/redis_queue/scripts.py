"""The shared queue's Lua scripts (scripts/*.lua): every change to the queue is one script, so
no two replicas ever take the same job or half-change one. Each is the prelude (the key names,
`finalize`, `fail`, `evict`) followed by the helpers it needs and its own body."""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from backends.sdxl_backend.units import MAX_CONTROLNETS, MAX_IP_ADAPTERS

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

FOLDER = Path(__file__).with_name("scripts")
# The fields of a job's hash that hold its input images, dropped when it ends.
INPUTS = [
    "init_image",
    "mask",
    *(f"control:{index}" for index in range(MAX_CONTROLNETS)),
    *(f"image_prompt:{index}" for index in range(MAX_IP_ADAPTERS)),
]
SCRIPTS = {
    "submit": [],
    "take": ["turns"],
    "position": ["turns"],
    "reclaim": ["requeue"],
    "hand_back": ["requeue"],
    "cancel": [],
    "finish": [],
    "forget_result": [],
    "record_webhook": [],
    "claim_webhooks": [],
}


def source(name: str, tombstone_ttl_s: float) -> str:
    prelude = Template((FOLDER / "prelude.lua").read_text()).substitute(
        inputs=", ".join(f"'{field}'" for field in INPUTS), tombstone_ttl_s=max(1, round(tombstone_ttl_s))
    )
    return "\n".join([prelude, *((FOLDER / f"{part}.lua").read_text() for part in [*SCRIPTS[name], name])])


def register(client: redis.Redis, tombstone_ttl_s: float) -> dict[str, Script]:
    """The scripts, with the tombstones' lifetime (`QueueBounds.tombstone_ttl_s`) written in."""
    return {name: client.register_script(source(name, tombstone_ttl_s)) for name in SCRIPTS}
