"""The Redis the replicas share (`SDXL_REDIS_URL`): the job queue, kept images and callers'
options live there, through one client."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)


def connect(url: str) -> redis.Redis:
    """The client of the Redis the replicas share, which may come up after us: until it does,
    the routes that need it answer 503."""
    import redis

    # Short timeouts: Redis out of reach is a quick 503, never a hanging request.
    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
        logger.info("the job queue, kept images and callers' options are shared through Redis (SDXL_REDIS_URL)")
    except redis.RedisError as exc:
        logger.warning(
            "Redis (SDXL_REDIS_URL) cannot be reached yet (%s); jobs and image links answer 503 until it can",
            type(exc).__name__,
        )
    return client
