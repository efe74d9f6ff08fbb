"""A client that hangs up cancels its request's work: the one place the API watches for it
(the way vLLM's `with_cancellation` does), so that a handler never polls its connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from backends.sdxl_backend.errors import Cancelled

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def _hangup(http: Request) -> None:
    # The body is read by now: the server's next message is the disconnect (or the end of the answer).
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def cancelled_on_hangup(http: Request, work: Awaitable[T]) -> T:
    """What `work` returns, unless the client hangs up first: then `work` is cancelled (a job it
    waits for is cancelled with it) and `Cancelled` is raised for an answer nobody reads."""
    task, hangup = asyncio.ensure_future(work), asyncio.ensure_future(_hangup(http))
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself is cancelled (a server timeout, a shutdown)
        task.cancel()
        raise
    finally:
        hangup.cancel()
    if not task.done():
        logger.info("client disconnected: its request is cancelled")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Cancelled("cancelled: the client disconnected")
    return task.result()
