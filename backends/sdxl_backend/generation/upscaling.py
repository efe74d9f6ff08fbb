"""An upscale request, from its checks to its encoded image: `POST /v1/upscale` and A1111's
extras. Not a job: it runs as a call handed to a device thread (between two jobs there), its
client waiting, and stops between two tiles when `should_stop` says so (the client left).

1. `prepare` (any thread): the upscaler is served, the image decodes within the limits, the
   output size is within `max_upscale_pixels` and the model's passes reach it;
2. `run` (the device thread): the model held (loaded under the budget beside the pipelines),
   the image upscaled in tiles, then encoded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from backends.sdxl_backend.device_thread import TORCH_WORK
from backends.sdxl_backend.errors import Cancelled, InvalidRequest
from backends.sdxl_backend.generation.images import MEDIA_TYPES, decode_image, encode_image
from backends.sdxl_backend.generation.validation import check_upscaler
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.upscalers import Tiling, passes_for, upscale
from backends.sdxl_backend.upscale_protocol import UpscaleRequest, UpscaleResult, UpscaleTimings

logger = logging.getLogger("sdxl_backend")


@dataclass
class PreparedUpscale:
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
        check_upscaler(self.models, "upscaler", request.upscaler, image.size, size)
        return PreparedUpscale(request.model_copy(update={"image": b""}), image, size)

    def run(self, prepared: PreparedUpscale, should_stop: Callable[[], bool] = lambda: False) -> UpscaleResult:
        """On the device thread: the upscale, then the encoding. Raises `Cancelled` between two
        tiles once `should_stop` is true, `OutOfMemory` when the device runs out."""
        request = prepared.request
        started, load_s, tiles = time.perf_counter(), 0.0, [0, 0]

        def on_tile(done: int, total: int) -> None:
            tiles[:] = done, total
            if should_stop():
                raise Cancelled(f"upscale cancelled after {done} of {total} tiles")

        if request.upscaler == "lanczos":
            picture, passes = prepared.image.resize(prepared.size, Image.Resampling.LANCZOS), 0
        else:
            with self.models.use_side_models([request.upscaler]) as ((model,), load_s):
                TORCH_WORK.note("upscale")
                picture = self.models.out_of_memory_as_error(
                    lambda: upscale(model, prepared.image, prepared.size, self.tiling, on_tile),
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
