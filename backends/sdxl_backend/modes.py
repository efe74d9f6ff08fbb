"""Memory modes: the one list of them (plain Python, so that the GPU benchmark can use it
without pydantic). What each mode does is in pipelines.py.

From the most resident to the least: `high` keeps everything on the device, `balanced`
offloads whole components, `low` offloads layer by layer and frees the model after the request.
"""

from __future__ import annotations

MEMORY_MODES: tuple[str, ...] = ("high", "balanced", "low")


def lower_mode(mode: str) -> str | None:
    """The mode an out-of-memory retry falls back to; None below `low`."""
    index = MEMORY_MODES.index(mode)
    return MEMORY_MODES[index + 1] if index + 1 < len(MEMORY_MODES) else None
