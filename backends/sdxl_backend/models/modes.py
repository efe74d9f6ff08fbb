"""Memory modes, the one list of them, and the policy that chooses among them (plain Python:
the settings and the GPU benchmark use them without loading torch). What each mode does is
in pipelines.py.

From the most resident to the least: `high` keeps everything on the device, `balanced`
offloads whole components, `low` offloads layer by layer and frees the model after the request.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORY_MODES: tuple[str, ...] = ("high", "balanced", "low")


def lower_mode(mode: str) -> str | None:
    """The mode an out-of-memory retry falls back to; None below `low`."""
    index = MEMORY_MODES.index(mode)
    return MEMORY_MODES[index + 1] if index + 1 < len(MEMORY_MODES) else None


@dataclass(frozen=True)
class MemoryPolicy:
    """How the manager spends device memory (the service sets it from `SDXL_*` variables)."""

    budget: int | None = None  # bytes; None: the device's total minus a margin
    default_mode: str = "high"
    tiling_pixels: int = 1536 * 1536  # larger images decode tiled in every mode
    idle_unload_s: float | None = None
