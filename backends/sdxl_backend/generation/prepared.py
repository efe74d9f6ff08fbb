"""A request that passed every check (`Engine.prepare()`), as it waits in the queue and reaches
the device: its own module, since the queue's stores, the jobs and the device's steps all
hold one, and none of them needs the engine that makes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from PIL import Image

from backends.sdxl_backend.generation.validation import output_size
from backends.sdxl_backend.models.ip_adapters import digest
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.prompts.reader import ReadPrompts
from backends.sdxl_backend.protocol import ResolvedRequest


@dataclass
class PreparedRequest:
    """A request that passed every check: every field filled in, the input image decoded at
    the output size. Only the device step is left."""

    kind: ClassVar[str] = "generation"

    request: ResolvedRequest  # as it will run; its image bytes are dropped (decoded below)
    source: ModelSource
    prompts: ReadPrompts = field(repr=False)  # as the model reads them
    init_image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)  # prepared: sized, inverted, blurred
    refiner: ModelSource | None = None  # the model that takes over at `request.refiner.switch_at`
    controls: list[Image.Image] = field(default_factory=list, repr=False)  # per ControlNet, at the output size
    image_prompts: list[Image.Image] = field(default_factory=list, repr=False)  # per IP-Adapter, the picture it reads
    refiner_prompts: ReadPrompts | None = field(default=None, repr=False)  # as the refiner reads them
    # The image prompts' identities, hashed once here: batch formation compares them per queued job.
    image_prompt_digests: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.image_prompt_digests = tuple(digest(picture) for picture in self.image_prompts)

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed + i for i in range(self.request.n)]

    @property
    def image_count(self) -> int:
        return self.request.n

    @property
    def total_steps(self) -> int:
        """Denoising steps the pipelines will run (img2img runs `steps x strength`; a hires fix
        adds its second pass)."""
        if self.init_image is not None:
            return int(self.request.steps * self.request.strength)
        hires = self.request.hires_fix
        return self.request.steps + (int(hires.steps * hires.strength) if hires else 0)

    @property
    def output_size(self) -> tuple[int, int]:
        return output_size(self.request)
