"""An upscale request, from its checks to its encoded image: `POST /v1/upscale`, A1111's
extras and MCP's tool. It is a job of its own kind: queued like a generation (fair shares,
`/v1/jobs`, any replica of a shared queue), never batched, its tiles counted as its steps.

1. `prepare` (any thread): the upscaler is served, the image decodes within the limits, the
   output size is within `max_upscale_pixels` and the model's passes reach it (`again`: the
   same checks where a replica takes it from a shared queue);
2. `run` (the device thread): the model held (loaded under the budget beside the pipelines),
   the image upscaled in tiles (the job's observer hears each, and stops it when cancelled),
   then encoded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

from PIL import Image

from backends.sdxl_backend.device_thread import TORCH_WORK
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.images import MEDIA_TYPES, decode_image, encode_image
from backends.sdxl_backend.generation.progress import StepObserver
from backends.sdxl_backend.generation.validation import check_upscaler
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.upscalers import Tiling, passes_for, upscale
from backends.sdxl_backend.upscale_protocol import UpscaleRequest, UpscaleResult, UpscaleTimings

logger = logging.getLogger(__name__)


@dataclass
class PreparedUpscale:
    """An upscale that passed every check, as it waits in the queue and reaches the device."""

    kind: ClassVar[str] = "upscale"
    image_count: ClassVar[int] = 1  # (what it adds to a batch's images: it runs alone)
    total_steps: ClassVar[int] = 0  # (its tiles, counted as it runs)

    request: UpscaleRequest  # its image bytes dropped (decoded below)
    image: Image.Image = field(repr=False)
    size: tuple[int, int]  # the output's


def output_size(request: UpscaleRequest, size: tuple[int, int]) -> tuple[int, int]:
    """Width and height as asked: both given, one (the other keeps the aspect ratio), or by scale."""
    width, height = size
    if request.width and request.height:
        return request.width, request.height
    if request.width:
        return request.width, max(1, round(height * request.width / width))
    if request.height:
        return max(1, round(width * request.height / height)), request.height
    return round(width * request.scale), round(height * request.scale)


class Upscaling:
    def __init__(self, models: ModelManager, limits: Limits, tiling: Tiling):
        self.models = models
        self.limits = limits
        self.tiling = tiling

    def prepare(self, request: UpscaleRequest) -> PreparedUpscale:
        """Everything before the device: raises `BackendError`s naming the field at fault."""
        image = decode_image(request.image, self.limits)
        size = output_size(request, image.size)
        if size[0] * size[1] > self.limits.max_upscale_pixels:
            named = "width" if request.width else "height" if request.height else "scale"
            raise InvalidRequest(
                f"{named}: {size[0]}x{size[1]} pixels is over the limit of {self.limits.max_upscale_pixels} "
                "pixels (SDXL_MAX_UPSCALE_PIXELS)",
                named,
            )
        return self.again(request.model_copy(update={"image": b""}), image)

    def again(self, request: UpscaleRequest, image: Image.Image) -> PreparedUpscale:
        """Prepared from its decoded image (a shared queue's replica taking it): the upscaler
        must be served here too."""
        size = output_size(request, image.size)
        check_upscaler(self.models, "upscaler", request.upscaler, image.size, size)
        return PreparedUpscale(request, image, size)

    def run(self, prepared: PreparedUpscale, on_tile: StepObserver | None = None) -> UpscaleResult:
        """On the device thread: the upscale, then the encoding. `on_tile` hears each tile as a
        step (and raises `Cancelled` to stop between two); `OutOfMemory` when the device runs out."""
        request = prepared.request
        started, load_s, tiles = time.perf_counter(), 0.0, [0, 0]

        def tile_done(done: int, total: int) -> None:
            tiles[:] = done, total
            if on_tile is not None:
                on_tile(done, total, None)  # (an upscale has no early stop: what it returns is not read)

        if request.upscaler == "lanczos":
            picture, passes = prepared.image.resize(prepared.size, Image.Resampling.LANCZOS), 0
        else:
            with self.models.use_side_models([request.upscaler]) as ((model,), load_s):
                TORCH_WORK.note("upscale")
                picture = self.models.out_of_memory_as_error(
                    lambda: upscale(model, prepared.image, prepared.size, self.tiling, tile_done),
                    f"out of memory upscaling with {request.upscaler} (a smaller SDXL_UPSCALE_TILE needs less)",
                )
            passes = passes_for(model.scale, prepared.image.size, prepared.size)
        upscaled_at = time.perf_counter()
        logger.info(
            "upscaled %dx%d to %dx%d with %s in %d tile(s): %.2f s",
            *prepared.image.size,
            *prepared.size,
            request.upscaler,
            tiles[1],
            upscaled_at - started,
        )
        scale = prepared.size[0] / prepared.image.width
        data = encode_image(
            picture,
            request.output_format,
            request.quality,
            f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {request.upscaler}",
        )
        return UpscaleResult(
            upscaler=request.upscaler,
            data=data,
            media_type=MEDIA_TYPES[request.output_format],
            width=picture.width,
            height=picture.height,
            passes=passes,
            tiles=tiles[1],
            timings=UpscaleTimings(
                load_s=load_s, upscale_s=upscaled_at - started - load_s, encode_s=time.perf_counter() - upscaled_at
            ),
        )
