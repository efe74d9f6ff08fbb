"""The sampling settings beside the scheduler, as diffusers runs them: CFG rescale and PAG
(pipeline arguments; PAG runs on diffusers' PAG pipelines, pipelines.py) and FreeU (a switch on
the UNet for the length of a call, off again after it, so that it never reaches a request that
did not ask for it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from backends.sdxl_backend.protocol import FreeU, ResolvedRequest


def guidance_arguments(request: ResolvedRequest) -> dict[str, Any]:
    """CFG rescale and PAG as the SDXL pipelines take them (each left out at 0, where it changes
    nothing, so that the pipelines without it still run a request that does not ask for it)."""
    arguments: dict[str, Any] = {"guidance_rescale": request.guidance_rescale} if request.guidance_rescale else {}
    return arguments | ({"pag_scale": request.pag_scale} if request.pag_scale else {})


@contextmanager
def freeu_applied(unet: Any, freeu: FreeU | None) -> Iterator[None]:
    """FreeU on `unet` while the block runs (nothing when `freeu` is None)."""
    if freeu is None:
        yield
        return
    unet.enable_freeu(s1=freeu.s1, s2=freeu.s2, b1=freeu.b1, b2=freeu.b2)
    try:
        yield
    finally:
        unet.disable_freeu()
