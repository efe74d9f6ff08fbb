"""A pipeline call's steps, handed to the requests in it: each request's step observer (its
job's progress, cancel and early stop) sees its own rows of the latents, and a request that is
cancelled leaves the call while the others go on."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from PIL import Image

from backends.sdxl_backend.errors import BackendError, Cancelled

if TYPE_CHECKING:
    import torch

    from backends.sdxl_backend.generation.prepared import PreparedRequest

# Called after each denoising step with (step, total steps, latents). It may raise to abandon
# the generation, or return True to end the denoising there and keep the image as it stands.
StepObserver = Callable[[int, int, "torch.Tensor | None"], "bool | None"]
Batch = list[tuple["PreparedRequest", "StepObserver | None"]]


class BatchProgress:
    """Hands each step of a pipeline call to the observers of the requests in it, each with its
    own rows of the latents. A request whose observer raises `Cancelled` is dropped from then
    on; when none is left, the call is abandoned."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.dropped: dict[int, Cancelled] = {}
        ends = list(itertools.accumulate(prepared.request.n for prepared, _ in batch))
        self.rows = [slice(end - prepared.request.n, end) for (prepared, _), end in zip(batch, ends)]

    def step(self, step: int, total: int, latents: torch.Tensor | None) -> bool:
        """True: every request still in the call asks to end the denoising here."""
        stops = []
        for index, ((_, on_step), rows) in enumerate(zip(self.batch, self.rows)):
            if on_step is None or index in self.dropped:
                continue
            try:
                stops.append(bool(on_step(step, total, None if latents is None else latents[rows])))
            except Cancelled as exc:
                if len(self.dropped) + 1 == len(self.batch):
                    raise
                self.dropped[index] = exc
        return bool(stops) and all(stops)

    def split(self, pictures: list) -> list[list[Image.Image] | BackendError]:
        """The call's images, each request's own (a dropped one gets its `Cancelled`)."""
        return [self.dropped.get(index) or list(pictures[rows]) for index, rows in enumerate(self.rows)]
