"""Waiting in tests: look again until what a test waits for holds. The time limit is a guard
that turns a hang into a failure saying what was awaited, never an assertion about speed:
limits are generous, so a busy 2-core machine passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(
    probe: Callable[[], T],
    until: Callable[[T], object] = bool,
    timeout: float = 600,
    every: float = 0.05,
    what: str = "the condition",
) -> T:
    """`probe()` again every `every` seconds until `until` holds for what it returns, which is
    returned; `TimeoutError` naming `what` and the last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:g} s; last seen: {value!r}"[:4000])
        time.sleep(every)
